"""The synthetic mini-RadImageNet: deterministic, balanced, labelled like the paper, and
readable back through the real-format readers."""
import numpy as np
import pytest
import torch

from modan_ext.data import synthetic
from modan_ext.data.metadata import paper_vocabulary
from modan_ext.data.readers import load_downstream_task, read_radimagenet_tree


@pytest.fixture(scope="module")
def small_set():
    return synthetic.make_pretraining_set(images_per_leaf=2, size=32, seed=3)


def test_same_seed_same_images_and_other_seed_other_images(small_set):
    again = synthetic.make_pretraining_set(images_per_leaf=2, size=32, seed=3)
    assert torch.equal(small_set.images, again.images)
    other = synthetic.make_pretraining_set(images_per_leaf=2, size=32, seed=4)
    assert not torch.equal(small_set.images, other.images)


def test_an_image_does_not_depend_on_how_many_are_generated(small_set):
    more = synthetic.make_pretraining_set(images_per_leaf=3, size=32, seed=3)
    # image i of leaf L is drawn from its own generator: the first two of each leaf agree
    per_leaf = {}
    for image, leaf in zip(more.images, more.leaves):
        per_leaf.setdefault(leaf, []).append(image)
    for image, leaf in zip(small_set.images, small_set.leaves):
        assert any(torch.equal(image, other) for other in per_leaf[leaf][:2])


def test_labels_are_the_papers_and_balanced_per_leaf(small_set):
    n_leaves = len(synthetic.COMBINATIONS) * len(synthetic.PATHOLOGIES)
    assert len(small_set) == 2 * n_leaves and small_set.images.shape == (2 * n_leaves, 1, 32, 32)
    assert small_set.images.dtype == torch.uint8
    leaves, counts = np.unique(small_set.leaves, return_counts=True)
    assert len(leaves) == n_leaves and set(counts) == {2}
    multi_hot = paper_vocabulary().encode_many(small_set.fields)  # raises on any unknown value
    assert (multi_hot.sum(1) == 2).all()
    modalities = {f["modality"] for f in small_set.fields}
    anatomies = {f["anatomy"] for f in small_set.fields}
    assert modalities == {"CT", "MR", "US"} and len(anatomies) == 9


def test_modalities_look_different():
    rng = lambda i: np.random.default_rng(i)  # noqa: E731
    ct = synthetic.make_image("CT", "abd", "normal", 48, rng(0))
    us = synthetic.make_image("US", "abd", "normal", 48, rng(0))
    assert ct.shape == us.shape == (48, 48) and 0 <= ct.min() and ct.max() <= 1
    # ultrasound: black outside the fan (top corners), CT: air around the body
    assert us[:4, :4].max() == 0 and us[24, 24] > 0
    assert synthetic.render_mr(np.full((8, 8), synthetic.FLUID, np.int8), rng(1), "T2").mean() > \
        synthetic.render_mr(np.full((8, 8), synthetic.FLUID, np.int8), rng(1), "T1").mean()


@pytest.mark.parametrize("name", synthetic.TASKS)
def test_downstream_tasks_are_deterministic_with_stratified_folds(name):
    task = synthetic.make_downstream_task(name, n_images=40, size=32, seed=1, folds=5)
    again = synthetic.make_downstream_task(name, n_images=40, size=32, seed=1, folds=5)
    assert torch.equal(task.images, again.images)
    assert 0 < task.targets.mean() < 1
    for train, val, test in task.folds:
        assert len(set(train) & set(test)) == 0 and len(set(val) & set(test)) == 0
        assert len(train) + len(val) + len(test) == 40
        assert abs(task.targets[test].mean() - task.targets.mean()) <= 0.13
    all_tests = np.concatenate([f[2] for f in task.folds])
    assert sorted(all_tests.tolist()) == list(range(40))  # every image is tested exactly once


def test_exported_data_reads_back_through_the_real_readers(tmp_path, small_set):
    synthetic.export_radimagenet_tree(small_set, tmp_path / "radiology_ai")
    records = read_radimagenet_tree(tmp_path)
    assert len(records) == len(small_set)
    assert sorted(tuple(sorted(r.fields.items())) for r in records) == \
        sorted(tuple(sorted(f.items())) for f in small_set.fields)
    task = synthetic.make_downstream_task("thyroid", n_images=20, size=32, seed=2, folds=4)
    synthetic.export_downstream_task(task, tmp_path / "thyroid")
    loaded = load_downstream_task(tmp_path / "thyroid", size=32)
    assert len(loaded.folds) == 4 and loaded.images.shape == task.images.shape
    assert sorted(loaded.targets.tolist()) == sorted(task.targets.tolist())
