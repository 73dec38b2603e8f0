"""The downstream protocol: linear probing on a toy task, fine-tuning's model selection, and
encoders from pretraining checkpoints."""
import numpy as np
import pytest
import torch

from modan_ext.data.records import DownstreamTask
from modan_ext.training import evaluation as ev

def _torchvision_available() -> bool:
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return False
    return True


needs_torchvision = pytest.mark.skipif(not _torchvision_available(),
                                       reason="the encoder is torchvision's ResNet-18 (extra 'examples')")


def test_linear_probe_on_a_separable_toy_task_reaches_auc_one():
    rng = np.random.default_rng(0)
    targets = np.array([0, 1] * 20)
    features = torch.from_numpy(rng.normal(size=(40, 8)) + 3 * targets[:, None]).float()
    task = DownstreamTask("toy", torch.zeros(40, 1, 4, 4, dtype=torch.uint8), targets, [])
    fold = (np.arange(24), np.arange(24, 32), np.arange(32, 40))
    cfg = ev.ProtocolConfig(probe_epochs=60, probe_eval_every=10, probe_lr=1e-2)
    result = ev.linear_probe_fold(features, task, fold, cfg, seed=0)
    assert result["auc"] == 1.0 and result["best_epoch"] in range(10, 61, 10)


def test_paper_protocol_and_its_overrides():
    paper = ev.ProtocolConfig.paper(repeats=2)
    assert (paper.repeats, paper.finetune_epochs, paper.finetune_batch_size, paper.step_size,
            paper.test_unit) == (2, 10, 32, 5, "repeat")
    with pytest.raises(ValueError, match="test_unit"):
        ev.ProtocolConfig(test_unit="image")


def test_fold_seeds_are_shared_by_models_and_distinct_per_fold():
    seeds = {ev.fold_seed(0, r, k) for r in range(10) for k in range(-1, 5)}
    assert len(seeds) == 60


def _fake_checkpoint(path, image_size, stem="7x7"):
    torch.save({"model": {"encoder.w": torch.ones(2), "head.b": torch.zeros(1)},
                "config": {"image_size": image_size, "stem": stem}}, path)


def test_encoders_from_checkpoints_add_scratch_with_their_stem(tmp_path):
    _fake_checkpoint(tmp_path / "a.pt", 40, "3x3")
    _fake_checkpoint(tmp_path / "b.pt", 40, "3x3")
    encoders, size = ev.encoders_from_checkpoints([("modan", tmp_path / "a.pt"),
                                                   ("simclr", tmp_path / "b.pt")])
    assert [e.name for e in encoders] == ["modan", "simclr", "scratch"] and size == 40
    assert list(encoders[0].state) == ["w"] and encoders[2].state is None
    assert encoders[2].stem == "3x3"
    encoders, size = ev.encoders_from_checkpoints([], scratch=True)
    assert [(e.name, e.stem) for e in encoders] == [("scratch", "7x7")] and size is None


def test_encoders_trained_at_different_sizes_are_refused(tmp_path):
    _fake_checkpoint(tmp_path / "a.pt", 40)
    _fake_checkpoint(tmp_path / "b.pt", 64)
    with pytest.raises(ValueError, match=r"different image sizes \[40, 64\]"):
        ev.encoders_from_checkpoints([("a", tmp_path / "a.pt"), ("b", tmp_path / "b.pt")])


@needs_torchvision
def test_evaluate_rows_cover_every_task_protocol_model_and_fold():
    rng = np.random.default_rng(0)
    targets = np.array([0, 1] * 6)
    images = torch.from_numpy(rng.integers(0, 255, (12, 1, 16, 16), dtype=np.uint8))
    folds = [(np.arange(0, 8), np.arange(8, 10), np.arange(10, 12)),
             (np.arange(4, 12), np.arange(0, 2), np.arange(2, 4))]
    task = DownstreamTask("toy", images, targets, folds)
    cfg = ev.ProtocolConfig(finetune_epochs=1, finetune_batch_size=4, probe_epochs=2,
                            probe_eval_every=1)
    rows = ev.evaluate([ev.Encoder("scratch", None, "3x3")], [task], cfg, log=lambda *_: None)
    assert [(r["protocol"], r["fold"]) for r in rows] == \
        [("finetune", 0), ("finetune", 1), ("linear", 0), ("linear", 1)]
    assert all(0 <= r["auc"] <= 1 and r["best_epoch"] >= 1 for r in rows)
    again = ev.evaluate([ev.Encoder("scratch", None, "3x3")], [task], cfg, log=lambda *_: None)
    assert rows == again  # seeded per (repeat, fold): reruns give the same AUCs
