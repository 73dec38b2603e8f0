"""Pretraining loop: one tiny step per loss, exact resume, interruption, checkpoint format,
run folders that are refused (a run already there, nothing to resume, other data or vocabulary),
unreadable checkpoints, progress output."""
import csv
import io
import sys

import pytest
import torch

pytest.importorskip("torchvision", reason="the encoder is torchvision's ResNet-18 (extra 'examples')")

from modan_ext.data import synthetic  # noqa: E402
from modan_ext.data.metadata import LabelVocabulary, paper_vocabulary  # noqa: E402
from modan_ext.training import augment, checkpoint, embedding, optim, pretraining  # noqa: E402
from modan_ext.training.model import build_encoder  # noqa: E402
from modan_ext.training.objective import LOSSES, mean_positives  # noqa: E402


@pytest.fixture(scope="module")
def tiny_set():
    return synthetic.make_pretraining_set(images_per_leaf=1, size=32, seed=0)


def _config(**overrides):
    base = dict(epochs=2, batch_size=8, image_size=32, embedding_points=0, warmup_epochs=0.5,
                loss_backend="reference")
    base.update(overrides)
    return pretraining.PretrainConfig(**base)


def _quiet(*_args, **_kwargs):
    pass


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same arithmetic in every run that is compared
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("loss", LOSSES)
def test_one_epoch_of_each_loss_writes_checkpoint_and_metrics(tmp_path, tiny_set, loss):
    summary = pretraining.pretrain(tiny_set, paper_vocabulary(), _config(loss=loss, epochs=1),
                                   tmp_path, log=_quiet, progress=False)
    assert summary["epochs_done"] == 1 and torch.isfinite(torch.tensor(summary["final_loss"]))
    ckpt = checkpoint.load_checkpoint(tmp_path / checkpoint.CHECKPOINT_NAME)  # weights_only
    assert ckpt["epoch"] == 1 and ckpt["config"]["loss"] == loss
    assert LabelVocabulary.from_json(ckpt["vocabulary"]).size == 12
    with open(tmp_path / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 1 and float(rows[0]["images_per_s"]) > 0
    expected_positives = {"simclr": 1.0, "supcon": 1.0}.get(loss)
    if expected_positives is not None:  # one image per leaf: only the other view is positive
        assert float(rows[0]["positives_per_anchor"]) == expected_positives
    else:  # images sharing modality or anatomy are positives too
        assert float(rows[0]["positives_per_anchor"]) > 1.0
    state, config = checkpoint.encoder_from_checkpoint(tmp_path / checkpoint.CHECKPOINT_NAME)
    encoder = build_encoder(config["stem"])
    encoder.load_state_dict(state)


def _weights(path):
    return checkpoint.load_checkpoint(path / checkpoint.CHECKPOINT_NAME)


def _assert_same_training_state(a, b):
    assert a["epoch"] == b["epoch"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert a["scheduler"] == b["scheduler"]
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]


def test_resume_after_one_epoch_equals_training_straight_through(tmp_path, tiny_set):
    vocab, cfg = paper_vocabulary(), _config()
    pretraining.pretrain(tiny_set, vocab, cfg, tmp_path / "straight", log=_quiet, progress=False)
    pretraining.pretrain(tiny_set, vocab, cfg, tmp_path / "split", stop_after_epochs=1,
                         log=_quiet, progress=False)
    assert _weights(tmp_path / "split")["epoch"] == 1
    torch.manual_seed(12345)  # disturb the global RNG: resume must restore it
    pretraining.pretrain(tiny_set, vocab, cfg, tmp_path / "split", resume=True, log=_quiet,
                         progress=False)
    _assert_same_training_state(_weights(tmp_path / "straight"), _weights(tmp_path / "split"))


def test_interrupt_mid_epoch_loses_only_that_epoch(tmp_path, tiny_set, monkeypatch):
    vocab, cfg = paper_vocabulary(), _config()
    pretraining.pretrain(tiny_set, vocab, cfg, tmp_path / "straight", log=_quiet, progress=False)

    calls = {"n": 0}
    real_two_views = pretraining.two_views

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:  # epoch 1 has 4 batches: this is the 2nd batch of epoch 2
            raise KeyboardInterrupt
        return real_two_views(*args, **kwargs)

    monkeypatch.setattr(pretraining, "two_views", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pretraining.pretrain(tiny_set, vocab, cfg, tmp_path / "crash", log=_quiet, progress=False)
    assert _weights(tmp_path / "crash")["epoch"] == 1  # the last complete epoch survived
    monkeypatch.setattr(pretraining, "two_views", real_two_views)
    pretraining.pretrain(tiny_set, vocab, cfg, tmp_path / "crash", resume=True, log=_quiet,
                         progress=False)
    _assert_same_training_state(_weights(tmp_path / "straight"), _weights(tmp_path / "crash"))


@pytest.mark.parametrize("change", [{"lr": 0.1}, {"chunk_size": 4}], ids=["lr", "chunk_size"])
def test_resume_refuses_a_different_config(tmp_path, tiny_set, change):
    vocab = paper_vocabulary()
    pretraining.pretrain(tiny_set, vocab, _config(epochs=1), tmp_path, log=_quiet, progress=False)
    with pytest.raises(checkpoint.CheckpointError, match=f"config differs.*{next(iter(change))}"):
        pretraining.pretrain(tiny_set, vocab, _config(epochs=1, **change), tmp_path, resume=True,
                             log=_quiet, progress=False)


# ---- gradient caching (PretrainConfig.chunk_size) -------------------------------------------

def _epoch_from_initial_state(tiny_set, out, log=_quiet, **overrides) -> tuple[dict, dict]:
    """(model state as the loop creates it, checkpoint after one epoch) of a run."""
    initial = {}

    class Recorded(pretraining.ContrastiveModel):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            initial.update({k: v.clone() for k, v in self.state_dict().items()})

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pretraining, "ContrastiveModel", Recorded)
        pretraining.pretrain(tiny_set, paper_vocabulary(), _config(epochs=1, **overrides), out,
                             log=log, progress=False)
    return initial, _weights(out)


@pytest.fixture(scope="module")
def plain_epoch(tiny_set, tmp_path_factory):
    return _epoch_from_initial_state(tiny_set, tmp_path_factory.mktemp("plain"))


def test_an_epoch_in_chunks_trains(tmp_path, tiny_set):
    lines = []
    initial, trained = _epoch_from_initial_state(tiny_set, tmp_path, lines.append, chunk_size=4)
    assert trained["epoch"] == 1 and trained["config"]["chunk_size"] == 4
    assert torch.isfinite(torch.tensor(trained["history"][0]["loss"]))
    assert trained["history"][0]["chunk_rows"] == 4
    parameters = [k for k in initial if k.endswith(("weight", "bias"))]
    assert len(parameters) > 60  # ResNet-18 and the head
    # by far more than weight decay alone (lr x 1e-4 of a weight) could move them
    unchanged = [k for k in parameters
                 if torch.allclose(trained["model"][k], initial[k], rtol=1e-3, atol=1e-6)]
    assert not unchanged
    assert "[modan] batch 8 images x 2 views x 1 rank = 16 rows a step; gradient caching: " \
           "chunks of 4 rows, 4 a rank a step" in lines


@pytest.mark.parametrize("chunk_size", [16, 1000], ids=["2B", "more"])
def test_one_chunk_of_the_whole_batch_trains_like_the_plain_step(tmp_path, tiny_set, plain_epoch,
                                                                 chunk_size):
    initial, plain = plain_epoch
    _, cached = _epoch_from_initial_state(tiny_set, tmp_path, chunk_size=chunk_size)
    # The same rows and BatchNorm groups, in another order (image- vs view-major), so float32
    # rounding differs and 4 SGD steps amplify it: measured, |cached - plain| is ~1e-3 of the
    # epoch's update |plain - initial|, as is the plain step's own difference when only the two
    # views swap places (3e-3); views paired with the wrong image give ~1.
    for key, value in plain["model"].items():
        if value.is_floating_point():
            update = (value - initial[key]).norm()
            assert (cached["model"][key] - value).norm() <= 1e-2 * update, key
        else:
            assert torch.equal(cached["model"][key], value), key  # num_batches_tracked
    assert cached["history"][0]["loss"] == pytest.approx(plain["history"][0]["loss"], rel=1e-4)


@pytest.mark.parametrize("chunk_size", [-2, 1, 3, 2.0, True, "4"])
def test_a_bad_chunk_size_is_refused_by_the_config(chunk_size):
    with pytest.raises(ValueError, match=r"chunk_size must be 0 \(the plain step\) or an even "
                                         r"number of rows.*got"):
        _config(chunk_size=chunk_size)


def _epoch_and_history(path):
    ckpt = _weights(path)
    return ckpt["epoch"], len(ckpt["history"])


def test_a_folder_holding_a_run_is_refused_unless_resumed_or_overwritten(tmp_path, tiny_set):
    vocab = paper_vocabulary()
    pretraining.pretrain(tiny_set, vocab, _config(), tmp_path, log=_quiet, progress=False)
    with pytest.raises(checkpoint.CheckpointError, match=r"checkpoint_last\.pt holds a run already: "
                                                         r"continue it with resume=True"):
        pretraining.pretrain(tiny_set, vocab, _config(epochs=1), tmp_path, log=_quiet, progress=False)
    assert _epoch_and_history(tmp_path) == (2, 2)  # the 2-epoch run is still there
    pretraining.pretrain(tiny_set, vocab, _config(epochs=1), tmp_path, overwrite=True, log=_quiet,
                         progress=False)
    assert _epoch_and_history(tmp_path) == (1, 1)  # a fresh run, as asked
    with pytest.raises(ValueError, match="resume and overwrite exclude each other"):
        pretraining.pretrain(tiny_set, vocab, _config(), tmp_path, resume=True, overwrite=True,
                             log=_quiet, progress=False)


def test_resume_into_a_folder_without_a_checkpoint_is_refused(tmp_path, tiny_set):
    with pytest.raises(checkpoint.CheckpointError, match=r"nothing to resume: .*checkpoint_last\.pt"):
        pretraining.pretrain(tiny_set, paper_vocabulary(), _config(), tmp_path / "new", resume=True,
                             log=_quiet, progress=False)
    assert not (tmp_path / "new" / checkpoint.CHECKPOINT_NAME).exists()


def test_resume_refuses_another_vocabulary_or_other_data(tmp_path, tiny_set):
    vocab = paper_vocabulary()
    pretraining.pretrain(tiny_set, vocab, _config(epochs=2), tmp_path, stop_after_epochs=1,
                         log=_quiet, progress=False)
    saved_vocabulary = (tmp_path / "vocabulary.json").read_text()
    wider = paper_vocabulary(unknown="zeros").with_field("view", ["axial", "sagittal"])
    with pytest.raises(checkpoint.CheckpointError, match=r"label vocabulary differs \(columns "
                                                         r"\[.*anatomy:thyroid'\] then, .*view:sagittal'\] now"):
        pretraining.pretrain(tiny_set, wider, _config(), tmp_path, resume=True, log=_quiet,
                             progress=False)
    with pytest.raises(checkpoint.CheckpointError, match="same columns, other synonyms"):
        pretraining.pretrain(tiny_set, paper_vocabulary(unknown="zeros"), _config(), tmp_path,
                             resume=True, log=_quiet, progress=False)
    other_images = synthetic.make_pretraining_set(images_per_leaf=1, size=32, seed=1)
    with pytest.raises(checkpoint.CheckpointError, match=r"images or labels \(data digest\) differs"):
        pretraining.pretrain(other_images, vocab, _config(), tmp_path, resume=True, log=_quiet,
                             progress=False)
    more_images = synthetic.make_pretraining_set(images_per_leaf=2, size=32, seed=0)
    with pytest.raises(checkpoint.CheckpointError, match=r"number of images differs \(33 then, 66 now\)"):
        pretraining.pretrain(more_images, vocab, _config(), tmp_path, resume=True, log=_quiet,
                             progress=False)
    assert (tmp_path / "vocabulary.json").read_text() == saved_vocabulary  # nothing rewritten
    assert _epoch_and_history(tmp_path) == (1, 1)


@pytest.mark.parametrize("content, problem", [
    (lambda good: good[: len(good) // 2], "not a readable checkpoint, truncated or corrupt"),
    (lambda good: good[:100], "failed finding central directory"),
    (lambda good: b"", "EOFError"),
    (lambda good: b"hello, world", "KeyError"),
])
def test_a_truncated_or_corrupt_checkpoint_is_named(tmp_path, tiny_set, content, problem):
    vocab = paper_vocabulary()
    pretraining.pretrain(tiny_set, vocab, _config(epochs=1), tmp_path, log=_quiet, progress=False)
    path = tmp_path / checkpoint.CHECKPOINT_NAME
    path.write_bytes(content(path.read_bytes()))
    with pytest.raises(checkpoint.CheckpointError, match=rf"checkpoint_last\.pt: .*{problem}"):
        checkpoint.encoder_from_checkpoint(path)
    with pytest.raises(checkpoint.CheckpointError, match=rf"checkpoint_last\.pt: .*{problem}"):
        pretraining.pretrain(tiny_set, vocab, _config(), tmp_path, resume=True, log=_quiet,
                             progress=False)


def test_a_checkpoint_of_another_kind_is_named(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "state_dict.pt")
    with pytest.raises(checkpoint.CheckpointError, match=r"state_dict\.pt: not a modan_ext "
                                                         r"pretraining checkpoint .*\['model', 'config'\]"):
        checkpoint.encoder_from_checkpoint(tmp_path / "state_dict.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(checkpoint.CheckpointError, match=r"list\.pt: not a modan_ext"):
        checkpoint.load_checkpoint(tmp_path / "list.pt")
    torch.save({"model": {}, "config": {}, "epoch": 1}, tmp_path / "older.pt")
    with pytest.raises(checkpoint.CheckpointError, match=r"older\.pt: .* lacks \['optimizer'"):
        checkpoint.load_checkpoint(tmp_path / "older.pt", required=checkpoint.RESUME_KEYS)
    with pytest.raises(checkpoint.CheckpointError, match=r"older\.pt: its model holds no 'encoder"):
        checkpoint.encoder_from_checkpoint(tmp_path / "older.pt")
    with pytest.raises(checkpoint.CheckpointError, match="checkpoint not found"):
        checkpoint.load_checkpoint(tmp_path / "missing.pt")


def test_checkpoints_still_load_weights_only(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("code ran",))

    torch.save({"model": Payload(), "config": {}}, tmp_path / "evil.pt")
    with pytest.raises(checkpoint.CheckpointError, match=r"evil\.pt: .*weights_only .*UnpicklingError"):
        checkpoint.load_checkpoint(tmp_path / "evil.pt")


def test_views_are_reproducible_and_different():
    images = torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8)
    cfg = _config()
    a = augment.two_views(images, augment.epoch_generator(0, 3, 0), cfg.crop_scale, cfg.jitter)
    b = augment.two_views(images, augment.epoch_generator(0, 3, 0), cfg.crop_scale, cfg.jitter)
    assert a.shape == (8, 1, 16, 16) and torch.equal(a, b)
    assert not torch.equal(a[:4], a[4:])
    assert a.min() >= -1 and a.max() <= 1


def test_learning_rate_warms_up_then_decays():
    cfg = _config(epochs=4, warmup_epochs=1)
    factors = [optim.lr_factor(step, 10, cfg) for step in range(40)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(x >= y for x, y in zip(factors[10:], factors[11:])) and factors[-1] < 0.01


def test_knn_accuracy_and_positive_counts():
    features = torch.tensor([[1.0, 0], [0.9, 0.1], [0, 1.0], [0.1, 0.9]])
    assert embedding.knn_accuracy(features, torch.tensor([0, 0, 1, 1]).numpy(), k=1) == 1.0
    labels = torch.tensor([[1, 0, 1, 0], [1, 0, 0, 1], [0, 1, 0, 1]])
    # Jaccard: (0,1) = 1/3 >= 0.3 -> positive; (0,2) = 0; (1,2) = 1/3 -> positive
    # anchor 0: own other view + 2 views of image 1 = 3; anchor 1: 1 + 2 + 2 = 5; anchor 2: 3
    assert mean_positives(labels, 3, 0.3) == pytest.approx(11 / 3)


def test_progress_is_one_log_line_per_epoch_when_stderr_is_not_a_terminal(tmp_path, tiny_set, capsys):
    lines = []
    pretraining.pretrain(tiny_set, paper_vocabulary(), _config(loss="simclr"), tmp_path,
                         log=lines.append, progress=True)
    assert lines[0] == "[simclr] batch 8 images x 2 views x 1 rank = 16 rows a step " \
                       "(plain step: 16 rows a rank at once)"
    epochs = [line for line in lines if line.startswith("[simclr] epoch ")]
    assert [line.split(":")[0] for line in epochs] == ["[simclr] epoch 1/2", "[simclr] epoch 2/2"]
    assert all(" img/s, " in line for line in epochs)
    assert capsys.readouterr().err == ""  # no redrawn bar in a log file


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_on_a_terminal(tmp_path, tiny_set, monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    lines = []
    pretraining.pretrain(tiny_set, paper_vocabulary(), _config(loss="simclr", epochs=1), tmp_path,
                         log=lines.append, progress=True)
    shown = terminal.getvalue()
    assert "[simclr] epoch 1/1" in shown and "4/4" in shown and "loss=" in shown
    assert not any(line.startswith("[simclr] epoch") for line in lines)  # the bar said it


def test_mean_positives_counts_what_the_loss_contrasts():
    ids = torch.tensor([3, 3, 5])
    # class ids: images 0 and 1 share a class: anchors 0 and 1 have 3 positives, anchor 2 one
    assert mean_positives(ids, 3, 0.3) == pytest.approx(7 / 3)
    # above 1 no label similarity passes: only the other view of the same image, as in the loss
    assert mean_positives(ids, 3, 1.5) == 1.0
    assert mean_positives(None, 5, 0.3) == 1.0  # simclr
