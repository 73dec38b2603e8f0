"""The paper's data: image records and where they come from, label vocabularies, readers for
real collections, the synthetic mini-RadImageNet, and the choice between real and synthetic.

Modules: `records` (what a reader returns and what the pipeline consumes), `metadata` (label
vocabulary), `readers` (RadImageNet, CSV, DICOM, fold CSVs), `images` (image files),
`synthetic` (generated data), `sources` (real-or-synthetic choice).

Layering: this package uses the loss core at most, never `modan_ext.training`.
"""
