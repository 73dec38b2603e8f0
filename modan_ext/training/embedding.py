"""What an encoder has learned, without training anything: leave-one-out k-NN accuracy of each
label field, and the paper's qualitative figure (a 2-D map of the encoder's features)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.metadata import LabelVocabulary
from ..data.records import ImageSet
from .model import encode_images
from .report.figures import plot_embedding
from .report.files import write_csv


def knn_accuracy(features: torch.Tensor, classes: np.ndarray, k: int = 5) -> float:
    """Leave-one-out k-NN accuracy (cosine similarity, majority vote): how well the embedding
    separates a label, without training anything."""
    z = F.normalize(features.double(), dim=1)
    sim = z @ z.T
    sim.fill_diagonal_(-float("inf"))
    neighbours = sim.topk(min(k, len(z) - 1), dim=1).indices.numpy()
    votes = classes[neighbours]
    predicted = np.array([np.bincount(v[v >= 0], minlength=classes.max() + 1).argmax()
                          if (v >= 0).any() else -1 for v in votes])
    return float((predicted == classes).mean())


def project_2d(features: torch.Tensor, seed: int, log=print) -> tuple[np.ndarray, str]:
    """t-SNE (scikit-learn) when importable, else PCA."""
    x = features.double().numpy()
    try:
        from sklearn.manifold import TSNE
        perplexity = float(min(30, max(5, (len(x) - 1) // 3)))
        return TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x), "t-SNE"
    except ImportError:
        log("scikit-learn is not installed: embedding map with PCA instead of t-SNE")
    x = x - x.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    return x @ vt[:2].T, "PCA"


def embedding_map(encoder: nn.Module, image_set: ImageSet, vocabulary: LabelVocabulary,
                  out_dir: Path, points: int, seed: int, log=print, title: str = "") -> dict:
    """The paper's qualitative figure: a 2-D map of encoder features coloured by modality and by
    anatomy (``embedding.png``, coordinates in ``embedding.csv``), plus leave-one-out 5-NN
    accuracy of each field (``embedding_knn.json``)."""
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.permutation(len(image_set))[:points])
    features = encode_images(encoder, image_set.images[torch.from_numpy(chosen)])
    multi_hot = vocabulary.encode_many([image_set.fields[i] for i in chosen])
    fields = [f for f in ("modality", "anatomy") if f in vocabulary.fields] or list(vocabulary.fields)[:2]
    classes = {f: vocabulary.field_index(multi_hot, f) for f in fields}
    leaves = sorted(set(image_set.leaves))
    classes["leaf"] = np.array([leaves.index(image_set.leaves[i]) for i in chosen])
    knn = {f"knn5_{name}": round(knn_accuracy(features, c), 4) for name, c in classes.items()}
    with open(out_dir / "embedding_knn.json", "w", encoding="utf-8") as fh:
        json.dump(knn, fh, indent=2)
    result = {**knn}
    coords, method = project_2d(features, seed, log)
    rows = []
    for row, i in enumerate(chosen):
        values = {f: vocabulary.values_of(f)[classes[f][row]] if classes[f][row] >= 0 else ""
                  for f in fields}
        rows.append({"x": f"{coords[row, 0]:.4f}", "y": f"{coords[row, 1]:.4f}", **values,
                     "leaf": image_set.leaves[i]})
    write_csv(rows, out_dir / "embedding.csv")
    titles = {f: f"{title} encoder, {method}: by {f} (5-NN acc {knn[f'knn5_{f}']:.2f})"
              for f in fields}
    plot = plot_embedding(coords, {f: classes[f] for f in fields},
                          {f: vocabulary.values_of(f) for f in fields}, titles,
                          out_dir / "embedding.png", log)
    if plot is not None:
        result["embedding_plot"] = plot
    return result
