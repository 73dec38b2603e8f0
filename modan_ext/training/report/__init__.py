"""What a run leaves behind: `files` (the one CSV writer and reader, the evaluation's result
files, run information), `summary` (fold AUCs -> per-cell means, sds and Wilcoxon p-values),
`tables` (markdown results table), `paper` (the paper's figures and the comparison with them),
`figures` (matplotlib plots and image sheets)."""
