"""Pretrain a ResNet-18 with ModAn-MulSupCon, or with the SimCLR / SupCon baselines.

    python examples/pretrain.py --loss modan --out runs/modan             # built-in synthetic data
    python examples/pretrain.py --loss simclr --out runs/simclr --resume  # continue after Ctrl-C
    python examples/pretrain.py --loss simclr --out runs/simclr --overwrite  # start that run again
    python examples/pretrain.py --paper --data-root /data/radimagenet --out runs/modan_paper
    torchrun --nproc-per-node 8 examples/pretrain.py --paper --data-root ... --out ...

--data-root takes a RadImageNet tree (CT|MR|US/... or a folder holding radiology_ai/), a folder of
DICOM files, a RadImageNet split CSV (filename,label) or a generic CSV (--path-column,
--field-columns). Without it, the synthetic mini-RadImageNet is generated (SYNTHETIC data).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from modan_ext.data.sources import load_pretraining_images
from modan_ext.training import cli
from modan_ext.training.checkpoint import CHECKPOINT_NAME, CheckpointError
from modan_ext.training.launch import shutdown_distributed
from modan_ext.training.objective import LOSSES
from modan_ext.training.pretraining import pretrain


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loss", choices=LOSSES, default="modan")
    parser.add_argument("--out", required=True, help="run folder: checkpoint, metrics, plots")
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument("--resume", action="store_true",
                          help="continue OUT/checkpoint_last.pt (same settings, vocabulary, data)")
    existing.add_argument("--overwrite", action="store_true",
                          help="start afresh in an OUT that holds a checkpoint (it is deleted)")
    cli.add_data_arguments(parser)
    cli.add_training_arguments(parser)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun, only rank 0 talks
    log = print if main_rank else (lambda *_args, **_kwargs: None)
    cfg = cli.pretrain_config(args, args.loss)
    vocabulary = cli.label_vocabulary(args)
    image_set = load_pretraining_images(cli.pretraining_data(args), cfg.image_size, vocabulary, log)
    try:
        summary = pretrain(image_set, vocabulary, cfg, args.out, resume=args.resume,
                           overwrite=args.overwrite, log=log)
    except CheckpointError as exc:
        raise SystemExit(f"pretrain.py: {exc}") from None
    except KeyboardInterrupt:
        if main_rank:
            print(f"\ninterrupted: the last complete epoch is in {args.out}/{CHECKPOINT_NAME}; "
                  "continue with --resume", file=sys.stderr)
        return 130
    finally:
        shutdown_distributed()
    log(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
