"""The examples' shared options: parsed into configs and data sources with the CPU defaults, the
paper's (--paper), and explicit overrides; bad values are argparse errors."""
import argparse

import pytest

from modan_ext.data.sources import PretrainingData, TaskData
from modan_ext.training import cli
from modan_ext.training.evaluation import ProtocolConfig
from modan_ext.training.pretraining import PretrainConfig


def _parse(*argv):
    parser = argparse.ArgumentParser()
    cli.add_data_arguments(parser)
    cli.add_training_arguments(parser)
    cli.add_protocol_arguments(parser)
    return parser.parse_args(list(argv))


def test_defaults_are_the_config_classes_defaults():
    args = _parse()
    assert cli.pretrain_config(args, "simclr") == PretrainConfig(loss="simclr")
    assert cli.protocol_config(args) == ProtocolConfig()
    assert cli.pretraining_data(args) == PretrainingData()
    assert cli.task_data(args) == TaskData()
    assert cli.label_vocabulary(args).size == 12


def test_paper_flag_selects_every_paper_preset():
    args = _parse("--paper")
    assert cli.pretrain_config(args, "modan") == PretrainConfig.paper(loss="modan")
    assert cli.protocol_config(args) == ProtocolConfig.paper()
    assert cli.pretraining_data(args).images_per_leaf == 100
    assert cli.task_data(args).images is None  # the real sets' sizes


def test_explicit_options_override_either_preset():
    args = _parse("--paper", "--epochs", "3", "--batch-size", "32", "--lr", "0.1", "--stem", "3x3",
                  "--no-amp", "--backend", "reference", "--image-size", "64", "--warmup-epochs",
                  "0.5", "--temperature", "0.1", "--threshold", "0.5", "--embedding-points", "0",
                  "--seed", "7", "--chunk-size", "64")
    cfg = cli.pretrain_config(args, "supcon")
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.stem, cfg.amp, cfg.loss_backend) == \
        (3, 32, 0.1, "3x3", False, "reference")
    assert (cfg.image_size, cfg.warmup_epochs, cfg.temperature, cfg.threshold,
            cfg.embedding_points, cfg.seed, cfg.chunk_size) == (64, 0.5, 0.1, 0.5, 0, 7, 64)
    assert cfg.crop_scale == (0.2, 1.0)  # still the paper's where not overridden
    args = _parse("--repeats", "3", "--finetune-epochs", "2", "--finetune-lr", "0.01",
                  "--finetune-batch-size", "8", "--probe-epochs", "9", "--test-unit", "repeat",
                  "--eval-seed", "5")
    assert cli.protocol_config(args) == ProtocolConfig(
        repeats=3, finetune_epochs=2, finetune_lr=0.01, finetune_batch_size=8, probe_epochs=9,
        test_unit="repeat", seed=5)


def test_data_options():
    args = _parse("--data-root", "/data/x.csv", "--field-columns", "modality=mod, anatomy=body",
                  "--leaf-column", "cls", "--us-fallback", "abd", "--path-column", "file",
                  "--images-per-leaf", "4", "--data-seed", "2")
    assert cli.pretraining_data(args) == PretrainingData(
        "/data/x.csv", "file", {"modality": "mod", "anatomy": "body"}, "cls", "abd", 4, 2)
    args = _parse("--tasks", "acl,,thyroid", "--task-images", "50", "--folds", "4",
                  "--task-seed", "3", "--task-dir", "a", "--task-dir", "b", "--protocols", "linear")
    assert cli.task_data(args) == TaskData(["a", "b"], ("acl", "thyroid"), 50, 4, 3)
    assert args.protocols == ["linear"]


@pytest.mark.parametrize("argv", [("--field-columns", "modality"), ("--field-columns", "=mod"),
                                  ("--stem", "5x5"), ("--unknown", "skip")])
def test_bad_options_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parse(*argv)
    assert exit_info.value.code == 2 and "error:" in capsys.readouterr().err


def test_checkpoint_spec():
    assert cli.checkpoint_spec("modan=runs/a=b.pt") == ("modan", "runs/a=b.pt")
    for bad in ("runs/a.pt", "=a.pt", "modan="):
        with pytest.raises(argparse.ArgumentTypeError, match="NAME=PATH"):
            cli.checkpoint_spec(bad)


def test_preset_drops_unset_values_only():
    assert cli.preset(ProtocolConfig, False, repeats=None, seed=0) == ProtocolConfig(seed=0)
    assert cli.preset(ProtocolConfig, True, repeats=2).repeats == 2
