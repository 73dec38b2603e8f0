"""Fine-tuning and linear probing of pretrained encoders on binary downstream tasks.

    python examples/evaluate.py --checkpoint modan=runs/modan/checkpoint_last.pt \
        --checkpoint simclr=runs/simclr/checkpoint_last.pt --out runs/eval
    python examples/evaluate.py --paper --task-dir data/acl --task-dir data/breast ... \
        --checkpoint modan=... --out runs/eval_paper

Tasks: the synthetic ones (acl, breast, thyroid; SYNTHETIC data) unless --task-dir points at
folders in the RadImageNet repository's format (<task>/dataframe/*_{train,val,test}_fold<k>.csv
with image paths relative to <task>/). A randomly initialised "scratch" encoder is always
included as a baseline (--no-scratch to drop it). Writes fold_aucs.csv, summary.csv, table.md
and auc_bars.png into --out and prints the table.
"""
from __future__ import annotations

import argparse
import sys

import torch

from modan_ext.data.sources import load_downstream_tasks
from modan_ext.training import cli
from modan_ext.training.evaluation import encoders_from_checkpoints, evaluate, model_names
from modan_ext.training.pretraining import PretrainConfig
from modan_ext.training.report.files import write_results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", action="append", default=[], type=cli.checkpoint_spec,
                        help="NAME=PATH (repeatable; a NAME given with several checkpoints of "
                             "different pretraining seeds: mean ± sd over the seeds)")
    parser.add_argument("--no-scratch", action="store_true", help="leave out the scratch baseline")
    parser.add_argument("--method", default=None, help="the model tested against the others "
                                                       "(default: modan if given)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--paper", action="store_true")
    parser.add_argument("--image-size", type=int, default=None, help="default: the checkpoints'")
    parser.add_argument("--threads", type=int, default=None)
    cli.add_protocol_arguments(parser)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        encoders, size = encoders_from_checkpoints(args.checkpoint, scratch=not args.no_scratch)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    # without checkpoints (scratch only): the default pretraining size
    tasks = load_downstream_tasks(cli.task_data(args), args.image_size or size or PretrainConfig.image_size)
    cfg = cli.protocol_config(args)
    names = model_names(encoders)
    method = args.method or ("modan" if "modan" in names else names[0])
    rows = evaluate(encoders, tasks, cfg, args.protocols)
    results = write_results(rows, args.out, method, names, cfg.test_unit)
    print("\n" + results["table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
