"""The command-line options that the example scripts share, and their translation into the
library's objects (data sources, configs). Unset options are None here, so that each config's own
defaults (CPU-sized, or the paper's with ``--paper``) stay in one place: the config classes."""
from __future__ import annotations

import argparse

from ..data.metadata import LabelVocabulary
from ..data.sources import PretrainingData, TaskData, choose_vocabulary, parse_field_columns
from ..data.synthetic import TASKS
from ..options import BACKENDS
from .evaluation import PROTOCOLS, ProtocolConfig
from .model import STEMS
from .pretraining import PretrainConfig

TRAINING_OPTIONS = (("epochs", int), ("batch-size", int), ("lr", float), ("image-size", int),
                    ("warmup-epochs", float), ("temperature", float), ("threshold", float),
                    ("embedding-points", int), ("seed", int))
PROTOCOL_OPTIONS = (("repeats", int), ("finetune-epochs", int), ("finetune-lr", float),
                    ("finetune-batch-size", int), ("probe-epochs", int))


def preset(cls, paper: bool, **overrides):
    """`cls.paper(...)` or `cls(...)` with the overrides that are set (not None)."""
    given = {k: v for k, v in overrides.items() if v is not None}
    return cls.paper(**given) if paper else cls(**given)


def _field_columns(text: str) -> dict:
    try:
        return parse_field_columns(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def checkpoint_spec(text: str) -> tuple[str, str]:
    """``NAME=PATH`` -> (name, path)."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH; got {text!r}")
    return name, path


def comma_list(text: str) -> list[str]:
    """Comma-separated names, empty ones dropped: "a,b,,c" -> ["a", "b", "c"]."""
    return [name for name in text.split(",") if name]


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("pretraining data")
    data.add_argument("--data-root", help="real data: folder / CSV / DICOM (default: synthetic)")
    data.add_argument("--path-column", default="path", help="generic CSV: image path column")
    data.add_argument("--field-columns", default=None, type=_field_columns,
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
    for name, kind in TRAINING_OPTIONS:
        train.add_argument(f"--{name}", type=kind, default=None)
    train.add_argument("--chunk-size", type=int, default=None, metavar="N",
                       help="gradient caching: embed N rows (images x 2 views, N even) at a time, "
                            "so the batch is not limited by the encoder's activations "
                            "(default 0: the whole batch at once)")
    train.add_argument("--stem", choices=STEMS, default=None,
                       help="first conv: 7x7/2 (authors' code, default) or 3x3/1 (paper text)")
    train.add_argument("--no-amp", action="store_true", help="no mixed precision on CUDA")
    train.add_argument("--backend", default="auto", choices=BACKENDS,
                       help="JaccardSupConLoss backend")
    train.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")


def add_protocol_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("protocol (defaults: CPU-sized; --paper: 5 folds x 10 repeats)")
    group.add_argument("--tasks", default=",".join(TASKS), type=comma_list, help="synthetic tasks to run")
    group.add_argument("--task-dir", action="append", default=[],
                       help="a real task in RadImageNet fold-CSV format (repeatable)")
    group.add_argument("--task-images", type=int, default=None,
                       help="synthetic: images per task (default 200; --paper: the real sets' sizes)")
    group.add_argument("--folds", type=int, default=5, help="synthetic: number of folds")
    group.add_argument("--protocols", default=",".join(PROTOCOLS), type=comma_list)
    group.add_argument("--test-unit", choices=("fold", "repeat"), default=None,
                       help="Wilcoxon pairs: per fold (default) or per repeat (--paper)")
    for name, kind in PROTOCOL_OPTIONS:
        group.add_argument(f"--{name}", type=kind, default=None)
    group.add_argument("--task-seed", type=int, default=0, help="synthetic tasks: generator seed")
    group.add_argument("--eval-seed", type=int, default=0, help="training seeds of the folds")


def _option_values(args: argparse.Namespace, options) -> dict:
    return {name.replace("-", "_"): getattr(args, name.replace("-", "_")) for name, _ in options}


def pretrain_config(args: argparse.Namespace, loss: str) -> PretrainConfig:
    return preset(PretrainConfig, args.paper, **_option_values(args, TRAINING_OPTIONS),
                  chunk_size=args.chunk_size, stem=args.stem, loss=loss, amp=not args.no_amp,
                  loss_backend=args.backend)


def protocol_config(args: argparse.Namespace) -> ProtocolConfig:
    return preset(ProtocolConfig, args.paper, **_option_values(args, PROTOCOL_OPTIONS),
                  test_unit=args.test_unit, seed=args.eval_seed)


def pretraining_data(args: argparse.Namespace) -> PretrainingData:
    return preset(PretrainingData, args.paper, root=args.data_root, path_column=args.path_column,
                  field_columns=args.field_columns, leaf_column=args.leaf_column,
                  us_fallback=args.us_fallback, images_per_leaf=args.images_per_leaf,
                  seed=args.data_seed)


def task_data(args: argparse.Namespace) -> TaskData:
    return preset(TaskData, args.paper, task_dirs=args.task_dir, names=tuple(args.tasks),
                  images=args.task_images, folds=args.folds, seed=args.task_seed)


def label_vocabulary(args: argparse.Namespace) -> LabelVocabulary:
    return choose_vocabulary(args.vocabulary, args.unknown)
