"""The data-source choice: synthetic or real pretraining images (labels checked before
training), synthetic or real downstream tasks, the label vocabulary."""
import json

import pytest
import torch

from modan_ext.data import sources, synthetic
from modan_ext.data.metadata import UnknownValueError, paper_vocabulary


def _quiet(*_args):
    pass


def test_synthetic_pretraining_images_by_default():
    messages = []
    image_set = sources.load_pretraining_images(sources.PretrainingData(images_per_leaf=1, seed=3),
                                                24, paper_vocabulary(), messages.append)
    expected = synthetic.make_pretraining_set(1, 24, 3)
    assert torch.equal(image_set.images, expected.images) and image_set.leaves == expected.leaves
    assert "SYNTHETIC" in messages[0] and "1 images x 33 leaves at 24 px" in messages[0]


def test_real_pretraining_images_from_a_radimagenet_tree(tmp_path):
    pytest.importorskip("PIL")
    synthetic.export_radimagenet_tree(synthetic.make_pretraining_set(1, 16, 0), tmp_path / "radiology_ai")
    messages = []
    image_set = sources.load_pretraining_images(sources.PretrainingData(root=str(tmp_path)), 16,
                                                paper_vocabulary(), messages.append)
    assert len(image_set) == 33 and image_set.images.shape == (33, 1, 16, 16)
    assert messages == [f"reading 33 images from {tmp_path} at 16 px"]


def test_a_bad_label_in_real_data_fails_before_any_image_is_loaded(tmp_path):
    (tmp_path / "a.png").write_text("not an image: loading it would fail, differently")
    (tmp_path / "meta.csv").write_text("path,modality,anatomy\na.png,PET,knee\n")
    source = sources.PretrainingData(root=str(tmp_path / "meta.csv"))
    with pytest.raises(UnknownValueError, match=r"meta\.csv, row 2"):
        sources.load_pretraining_images(source, 16, paper_vocabulary(), _quiet)


def test_generic_csv_columns_reach_the_reader(tmp_path):
    pytest.importorskip("PIL")
    from modan_ext.data.images import save_png
    save_png(torch.full((8, 8), 7, dtype=torch.uint8).numpy(), tmp_path / "img" / "a.png")
    (tmp_path / "meta.csv").write_text("file,mod,body,cls\nimg/a.png,MRI,HEAD,glioma\n")
    source = sources.PretrainingData(root=str(tmp_path / "meta.csv"), path_column="file",
                                     field_columns={"modality": "mod", "anatomy": "body"},
                                     leaf_column="cls")
    image_set = sources.load_pretraining_images(source, 8, paper_vocabulary(), _quiet)
    assert image_set.fields == [{"modality": "MRI", "anatomy": "HEAD"}]
    assert image_set.leaves == ["glioma"] and int(image_set.images.float().mean()) == 7


def test_synthetic_tasks_cpu_and_paper_sizes(monkeypatch):
    made = []
    monkeypatch.setattr(sources, "make_downstream_task",
                        lambda name, n, size, seed, folds: made.append((name, n, size, seed, folds)))
    sources.load_downstream_tasks(sources.TaskData(names=("acl", "thyroid"), seed=4, folds=3), 32, _quiet)
    sources.load_downstream_tasks(sources.TaskData.paper(names=("breast",)), 32, _quiet)
    assert made == [("acl", 200, 32, 4, 3), ("thyroid", 200, 32, 4, 3),
                    ("breast", synthetic.PAPER_TASK_SIZES["breast"], 32, 0, 5)]


def test_real_tasks_from_fold_csvs(tmp_path):
    pytest.importorskip("PIL")
    task = synthetic.make_downstream_task("acl", n_images=12, size=16, seed=0, folds=3)
    synthetic.export_downstream_task(task, tmp_path / "acl")
    messages = []
    loaded = sources.load_downstream_tasks(sources.TaskData(task_dirs=[str(tmp_path / "acl")]), 16,
                                           messages.append)
    assert [t.name for t in loaded] == ["acl"] and len(loaded[0].folds) == 3
    assert messages == ["task acl: 12 images, 3 folds (from acl/dataframe)"]


def test_field_columns_and_vocabulary_choice(tmp_path):
    assert sources.parse_field_columns(None) is None
    assert sources.parse_field_columns("modality=mod,view=v") == {"modality": "mod", "view": "v"}
    with pytest.raises(ValueError, match="field=column pairs"):
        sources.parse_field_columns("modality=mod,anatomy")
    assert sources.choose_vocabulary(unknown="column").size == 14
    vocabulary = paper_vocabulary().with_field("view", ["axial"])
    vocabulary.save(tmp_path / "v.json")
    assert sources.choose_vocabulary(str(tmp_path / "v.json")).columns == vocabulary.columns
    assert json.loads((tmp_path / "v.json").read_text())["unknown"] == "error"
