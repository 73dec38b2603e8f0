"""Pretrain a ResNet-18 with ModAn-MulSupCon, or with the SimCLR / SupCon baselines.

    python examples/pretrain.py --loss modan --out runs/modan             # built-in synthetic data
    python examples/pretrain.py --loss simclr --out runs/simclr --resume  # continue after Ctrl-C
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

from modan_ext import pretraining, readers, synthetic
from modan_ext.metadata import LabelVocabulary, paper_vocabulary


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("pretraining data")
    data.add_argument("--data-root", help="real data: folder / CSV / DICOM (default: synthetic)")
    data.add_argument("--path-column", default="path", help="generic CSV: image path column")
    data.add_argument("--field-columns", default=None,
                      help="generic CSV: field=column pairs, e.g. modality=mod,anatomy=body_part")
    data.add_argument("--leaf-column", default=None, help="generic CSV: fine class (for supcon)")
    data.add_argument("--us-fallback", default=None,
                      help="anatomy for RadImageNet US labels without a mapping (default: error)")
    data.add_argument("--vocabulary", default=None, help="label vocabulary JSON (default: paper's 12)")
    data.add_argument("--unknown", default="error", choices=("error", "zeros", "column"),
                      help="what an unknown/missing metadata value does (default vocabulary)")
    data.add_argument("--images-per-leaf", type=int, default=None,
                      help="synthetic: images per modality/anatomy/pathology leaf (33 leaves)")
    data.add_argument("--data-seed", type=int, default=0, help="synthetic: generator seed")


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    train = parser.add_argument_group("training (defaults: CPU-sized; --paper: the paper's)")
    train.add_argument("--paper", action="store_true",
                       help="paper settings: 224 px, batch 256, 200 epochs, 3 warm-up (a GPU job)")
    for name, kind in (("epochs", int), ("batch-size", int), ("lr", float), ("image-size", int),
                       ("warmup-epochs", float), ("temperature", float), ("threshold", float),
                       ("embedding-points", int), ("seed", int)):
        train.add_argument(f"--{name}", type=kind, default=None)
    train.add_argument("--stem", choices=("7x7", "3x3"), default=None,
                       help="first conv: 7x7/2 (authors' code, default) or 3x3/1 (paper text)")
    train.add_argument("--no-amp", action="store_true", help="no mixed precision on CUDA")
    train.add_argument("--backend", default="auto", choices=("auto", "kernel", "reference"),
                       help="JaccardSupConLoss backend")
    train.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")


def pretrain_config(args, loss: str) -> pretraining.PretrainConfig:
    overrides = {key: getattr(args, key) for key in
                 ("epochs", "batch_size", "lr", "image_size", "warmup_epochs", "temperature",
                  "threshold", "embedding_points", "seed", "stem") if getattr(args, key) is not None}
    overrides.update(loss=loss, amp=not args.no_amp, loss_backend=args.backend)
    return pretraining.PretrainConfig.paper(**overrides) if args.paper else \
        pretraining.PretrainConfig(**overrides)


def load_vocabulary(args) -> LabelVocabulary:
    return LabelVocabulary.load(args.vocabulary) if args.vocabulary else paper_vocabulary(args.unknown)


def load_data(args, image_size: int, vocabulary: LabelVocabulary, log=print):
    """The pretraining images; every label is checked here, so a bad row fails before training."""
    if args.data_root:
        field_columns = dict(pair.split("=", 1) for pair in args.field_columns.split(",")) \
            if args.field_columns else None
        records = readers.read_any(args.data_root, args.path_column, field_columns,
                                   args.leaf_column, args.us_fallback)
        vocabulary.encode_many([r.fields for r in records], [r.source for r in records])
        log(f"reading {len(records)} images from {args.data_root} at {image_size} px")
        return readers.load_image_set(records, image_size)
    per_leaf = args.images_per_leaf or (100 if args.paper else 30)
    log(f"generating the SYNTHETIC mini-RadImageNet: {per_leaf} images x "
        f"{len(synthetic.COMBINATIONS) * len(synthetic.PATHOLOGIES)} leaves at {image_size} px")
    return synthetic.make_pretraining_set(per_leaf, image_size, args.data_seed)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loss", choices=pretraining.LOSSES, default="modan")
    parser.add_argument("--out", required=True, help="run folder: checkpoint, metrics, plots")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint_last.pt")
    add_data_arguments(parser)
    add_training_arguments(parser)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun, only rank 0 talks
    log = print if main_rank else (lambda *_args, **_kwargs: None)
    cfg = pretrain_config(args, args.loss)
    vocabulary = load_vocabulary(args)
    image_set = load_data(args, cfg.image_size, vocabulary, log)
    try:
        summary = pretraining.pretrain(image_set, vocabulary, cfg, args.out, resume=args.resume,
                                       log=log)
    except KeyboardInterrupt:
        if main_rank:
            print(f"\ninterrupted: the last complete epoch is in {args.out}/"
                  f"{pretraining.CHECKPOINT_NAME}; continue with --resume", file=sys.stderr)
        return 130
    finally:
        pretraining.shutdown_distributed()
    log(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
