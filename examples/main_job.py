"""The project's main job: pretrain ModAn-MulSupCon and its baselines, then evaluate them.

    python examples/main_job.py                      # SYNTHETIC data, ~7 min on a 2-core CPU
    python examples/main_job.py --seeds 3            # mean ± sd over 3 pretraining seeds
    python examples/main_job.py --paper --data-root /data/radimagenet \
        --task-dir data/acl --task-dir data/breast --task-dir data/thyroid   # a GPU job

Steps: (1) pretraining data (synthetic mini-RadImageNet unless --data-root); (2) pretrain with
--losses (default modan, supcon, simclr) and each of --seeds seeds into RUN_DIR/<loss>/seed<k>/,
resuming any finished or interrupted run (rerun the same command after Ctrl-C); (3) fine-tuning
and linear probing of every encoder and a scratch baseline on the downstream tasks; (4) tables,
plots and a comparison with the paper's numbers in --results (default RUN_DIR/results: the
committed examples/results/ is the reference run and is only written when named).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from modan_ext.data.images import save_png
from modan_ext.data.sources import load_downstream_tasks, load_pretraining_images
from modan_ext.data.synthetic import contact_sheet
from modan_ext.training import cli
from modan_ext.training.checkpoint import CHECKPOINT_NAME, CheckpointError, has_checkpoint
from modan_ext.training.evaluation import encoders_from_checkpoints, evaluate, model_names
from modan_ext.training.pretraining import pretrain
from modan_ext.training.report.figures import plot_loss_curves, task_sheet
from modan_ext.training.report.files import read_csv, write_csv, write_results, write_run_info
from modan_ext.training.report.paper import comparison_markdown
from modan_ext.training.report.summary import pretraining_rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default="runs/main_job",
                        help="checkpoints and per-run outputs: RUN_DIR/<loss>/seed<k>/")
    parser.add_argument("--results", default=None,
                        help="tables and figures (default: RUN_DIR/results; examples/results is "
                             "the committed reference run)")
    parser.add_argument("--losses", default="modan,supcon,simclr", type=cli.comma_list)
    parser.add_argument("--seeds", type=int, default=1,
                        help="pretraining seeds per loss, --seed, --seed + 1, ...: the tables "
                             "give mean ± sd over them (default 1, ~7 min on 2 cores; 3 "
                             "seeds ~19 min)")
    cli.add_data_arguments(parser)
    cli.add_training_arguments(parser)
    cli.add_protocol_arguments(parser)
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1; got {args.seeds}")
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    run_dir = Path(args.run_dir)
    results = Path(args.results) if args.results else run_dir / "results"
    results.mkdir(parents=True, exist_ok=True)
    timings = {}

    # 1. data
    t = time.perf_counter()
    configs = {loss: cli.pretrain_config(args, loss) for loss in args.losses}
    size = next(iter(configs.values())).image_size
    vocabulary = cli.label_vocabulary(args)
    image_set = load_pretraining_images(cli.pretraining_data(args), size, vocabulary)
    if not args.data_root:
        save_png(contact_sheet(image_set), results / "samples.png", scale=2)
    timings["pretraining_data_s"] = round(time.perf_counter() - t, 1)

    # 2. pretraining: every loss with every seed, each in its own folder
    first_seed = next(iter(configs.values())).seed
    seeds = list(range(first_seed, first_seed + args.seeds))
    runs = {(loss, seed): run_dir / loss / f"seed{seed}" for loss in args.losses for seed in seeds}
    summaries, histories = {}, {}
    for (loss, seed), folder in runs.items():
        t = time.perf_counter()
        print(f"\n== pretraining: {loss}, seed {seed} ==", flush=True)
        try:
            summaries[(loss, seed)] = pretrain(image_set, vocabulary,
                                               dataclasses.replace(configs[loss], seed=seed),
                                               folder, resume=has_checkpoint(folder))
        except CheckpointError as exc:
            raise SystemExit(f"main_job.py: {exc}") from None
        except KeyboardInterrupt:
            print(f"\ninterrupted: rerun the same command to continue from {folder}",
                  file=sys.stderr)
            return 130
        timings[f"pretrain_{loss}_seed{seed}_s"] = round(time.perf_counter() - t, 1)
        histories[loss if len(seeds) == 1 else f"{loss} seed {seed}"] = \
            read_csv(folder / "metrics.csv", float)
        if seed == first_seed and (folder / "embedding.png").exists():
            shutil.copy(folder / "embedding.png", results / f"embedding_{loss}.png")
    del image_set
    plot_loss_curves(histories, results / "loss_curves.png", relative=True)
    write_csv(pretraining_rows(summaries), results / "pretraining.csv")

    # 3. evaluation: every encoder and the tasks loaded once
    print("\n== downstream evaluation ==", flush=True)
    t = time.perf_counter()
    checkpoints = [(loss, folder / CHECKPOINT_NAME) for (loss, _), folder in runs.items()]
    encoders, _ = encoders_from_checkpoints(checkpoints, scratch=True)
    tasks = load_downstream_tasks(cli.task_data(args), size)
    if not args.task_dir:
        save_png(task_sheet(tasks), results / "task_samples.png", scale=2)
    protocol = cli.protocol_config(args)
    names = model_names(encoders)
    method = "modan" if "modan" in names else names[0]
    rows = evaluate(encoders, tasks, protocol, args.protocols)
    outcome = write_results(rows, results, method, names, protocol.test_unit)
    print("\n" + outcome["table"])
    timings["evaluation_s"] = round(time.perf_counter() - t, 1)

    # 4. comparison and run information
    if "modan" in args.losses:
        (results / "comparison.md").write_text(comparison_markdown(outcome["summary"]), encoding="utf-8")
    timings["total_s"] = round(time.perf_counter() - started, 1)
    command = " ".join([os.path.basename(sys.argv[0])] + (argv if argv is not None else sys.argv[1:]))
    write_run_info(results / "run_info.json", command, not args.data_root and not args.task_dir,
                   timings, configs, protocol, seeds)
    print(f"\nmain job done in {timings['total_s']:.0f} s; results in {results}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
