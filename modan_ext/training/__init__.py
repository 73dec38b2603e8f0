"""Training and evaluating encoders on the paper's data: the pretraining loop and what it is made
of, the downstream protocol, statistics and the written report.

    from modan_ext.training import cached_contrastive_backward   # gradient caching (`cached`)

That function is the package's one re-export: it needs nothing but torch, so importing the package
stays cheap. Import every other module directly (adding one needs no edit here):
`model` (encoder, heads), `augment` (views), `objective` (each loss's labels and loss function),
`optim` (SGD and its schedule), `checkpoint` (save, load, resume), `launch` (process group,
sharding), `pretraining` (config and loop), `cached` (gradient caching: batches whose activations
do not fit), `embedding` (features, k-NN, 2-D map), `evaluation` (fine-tuning and linear probing),
`stats` (AUC, Wilcoxon), `report` (CSV, tables, figures), `cli` (the command-line options that
examples/ share).

Layering: this package may import the loss core and `modan_ext.data`; neither imports it.
"""
from .cached import cached_contrastive_backward

__all__ = ["cached_contrastive_backward"]
