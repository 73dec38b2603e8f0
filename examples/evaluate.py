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

from modan_ext import evaluation, readers, synthetic
from modan_ext.pretraining import encoder_from_checkpoint


def add_protocol_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("protocol (defaults: CPU-sized; --paper: 5 folds x 10 repeats)")
    group.add_argument("--tasks", default=",".join(synthetic.TASKS), help="synthetic tasks to run")
    group.add_argument("--task-dir", action="append", default=[],
                       help="a real task in RadImageNet fold-CSV format (repeatable)")
    group.add_argument("--task-images", type=int, default=None,
                       help="synthetic: images per task (default 200; --paper: the real sets' sizes)")
    group.add_argument("--folds", type=int, default=5, help="synthetic: number of folds")
    group.add_argument("--protocols", default="finetune,linear")
    group.add_argument("--test-unit", choices=("fold", "repeat"), default=None,
                       help="Wilcoxon pairs: per fold (default) or per repeat (--paper)")
    for name, kind in (("repeats", int), ("finetune-epochs", int), ("finetune-lr", float),
                       ("finetune-batch-size", int), ("probe-epochs", int)):
        group.add_argument(f"--{name}", type=kind, default=None)
    group.add_argument("--task-seed", type=int, default=0, help="synthetic tasks: generator seed")
    group.add_argument("--eval-seed", type=int, default=0, help="training seeds of the folds")


def protocol_config(args) -> evaluation.ProtocolConfig:
    overrides = {key: getattr(args, key) for key in
                 ("repeats", "finetune_epochs", "finetune_lr", "finetune_batch_size", "probe_epochs",
                  "test_unit") if getattr(args, key, None) is not None}
    overrides["seed"] = args.eval_seed
    return evaluation.ProtocolConfig.paper(**overrides) if args.paper else \
        evaluation.ProtocolConfig(**overrides)


def load_tasks(args, image_size: int, log=print) -> list:
    if args.task_dir:
        tasks = [readers.load_downstream_task(d, image_size) for d in args.task_dir]
        for t in tasks:
            log(f"task {t.name}: {len(t.targets)} images, {len(t.folds)} folds (from {t.name}/dataframe)")
        return tasks
    tasks = []
    for name in [t for t in args.tasks.split(",") if t]:
        n = args.task_images or (synthetic.PAPER_TASK_SIZES[name] if args.paper else 200)
        tasks.append(synthetic.make_downstream_task(name, n, image_size, args.task_seed, args.folds))
        log(f"task {name}: {n} SYNTHETIC images at {image_size} px, {args.folds} stratified folds")
    return tasks


def load_encoders(checkpoints: list[str], scratch: bool) -> tuple[list, int]:
    """Encoders named NAME=PATH, plus scratch; and the image size they were trained at."""
    encoders, sizes, stems = [], set(), set()
    for spec in checkpoints:
        name, sep, path = spec.partition("=")
        if not sep:
            raise SystemExit(f"--checkpoint expects NAME=PATH; got {spec!r}")
        state, config = encoder_from_checkpoint(path)
        encoders.append(evaluation.Encoder(name, state, config["stem"]))
        sizes.add(config["image_size"])
        stems.add(config["stem"])
    if len(sizes) > 1:
        raise SystemExit(f"checkpoints were trained at different image sizes {sorted(sizes)}")
    if scratch:
        encoders.append(evaluation.Encoder("scratch", None, stems.pop() if len(stems) == 1 else "7x7"))
    return encoders, (sizes.pop() if sizes else None)


def run(args, log=print) -> dict:
    encoders, size = load_encoders(args.checkpoint, not args.no_scratch)
    size = args.image_size or size or 40
    tasks = load_tasks(args, size, log)
    cfg = protocol_config(args)
    names = [e.name for e in encoders]
    method = args.method or ("modan" if "modan" in names else names[0])
    rows = evaluation.evaluate(encoders, tasks, cfg, args.protocols.split(","), log=log)
    results = evaluation.write_results(rows, args.out, method, names, cfg.test_unit, log)
    log("\n" + results["table"])
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", action="append", default=[], help="NAME=PATH (repeatable)")
    parser.add_argument("--no-scratch", action="store_true", help="leave out the scratch baseline")
    parser.add_argument("--method", default=None, help="the model tested against the others "
                                                       "(default: modan if given)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--paper", action="store_true")
    parser.add_argument("--image-size", type=int, default=None, help="default: the checkpoints'")
    parser.add_argument("--threads", type=int, default=None)
    add_protocol_arguments(parser)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
