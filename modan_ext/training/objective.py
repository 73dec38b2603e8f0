"""What the three pretraining losses contrast on, and the loss function itself.

One loop serves the three losses, so the baselines differ from the method only in their labels:

* ``modan``: `JaccardSupConLoss` with multi-hot metadata labels (modality + anatomy, ...);
* ``supcon``: the same loss with leaf-class ids (RadImageNet's MOD/ANATOMY/PATHOLOGY): SupCon;
* ``simclr``: no labels: only the other view of an image is a positive (NT-Xent).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.metadata import LabelVocabulary
from ..data.records import ImageSet
from ..loss import JaccardSupConLoss
from ..options import DEFAULTS
from ..reference import label_similarity, positive_weights

LOSSES = ("simclr", "supcon", "modan")


@dataclass
class EncodedLabels:
    """Per-image labels for every loss: multi-hot [N, L] and leaf-class ids [N]."""

    multi_hot: torch.Tensor
    leaf_ids: torch.Tensor
    leaf_names: list


def encode_labels(image_set: ImageSet, vocabulary: LabelVocabulary) -> EncodedLabels:
    where = [f"image {i} ({leaf})" for i, leaf in enumerate(image_set.leaves)]
    multi_hot = torch.from_numpy(vocabulary.encode_many(image_set.fields, where))
    names = sorted(set(image_set.leaves))
    lookup = {name: i for i, name in enumerate(names)}
    leaf_ids = torch.tensor([lookup[leaf] for leaf in image_set.leaves], dtype=torch.int64)
    return EncodedLabels(multi_hot, leaf_ids, names)


def batch_labels(loss: str, labels: EncodedLabels, index: torch.Tensor) -> torch.Tensor | None:
    """The labels `loss` is given for the images `index`: multi-hot, class ids, or None."""
    if loss == "modan":
        return labels.multi_hot[index]
    if loss == "supcon":
        return labels.leaf_ids[index]
    return None  # simclr


def mean_positives(labels: torch.Tensor | None, images: int, threshold: float) -> float:
    """Average number of positives per anchor row among the 2B - 1 others (paper: ~330 of 511
    at batch 256): a check that the labels mean what they should. Positives are the loss's own
    (`modan_ext.reference`, the weighting `make_loss` uses), so this counts what the loss
    contrasts."""
    device = labels.device if labels is not None else None
    similarity = label_similarity(labels, images, DEFAULTS.weighting, device)  # float64
    similar_images = (positive_weights(similarity, threshold, DEFAULTS.weighting) > 0).float().sum(1)
    return float((2 * similar_images - 1).mean())  # both views of each similar image, minus self


def make_loss(temperature: float, threshold: float, backend: str = "auto",
              gather_distributed: bool = False) -> JaccardSupConLoss:
    """The loss of every run (T = T_base, as the paper); `gather_distributed` contrasts against
    the negatives of every rank."""
    return JaccardSupConLoss(temperature=temperature, base_temperature=temperature,
                             threshold=threshold, backend=backend,
                             gather_distributed=gather_distributed)
