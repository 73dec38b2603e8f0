"""Where the pipeline's data comes from: real collections (a folder, a CSV, DICOM files, fold
CSVs) or the synthetic mini-RadImageNet and its tasks; and which label vocabulary reads them.
Every label of real pretraining data is checked here, so a bad row fails before training."""
from __future__ import annotations

from dataclasses import dataclass, field

from .images import load_image_set
from .metadata import LabelVocabulary, paper_vocabulary
from .readers import load_downstream_task, read_any
from .records import DownstreamTask, ImageSet
from .synthetic import (COMBINATIONS, PAPER_TASK_SIZES, PATHOLOGIES, TASKS, make_downstream_task,
                        make_pretraining_set)


@dataclass
class PretrainingData:
    """The pretraining images: `root` (real data, see `read_any`) or, when None, the synthetic
    set with `images_per_leaf` images per modality/anatomy/pathology leaf."""

    root: str | None = None
    path_column: str = "path"               # generic CSV: the image path column
    field_columns: dict | None = None       # generic CSV: {field: column}
    leaf_column: str | None = None          # generic CSV: fine class (for supcon)
    us_fallback: str | None = None          # RadImageNet US labels without an anatomy mapping
    images_per_leaf: int = 30               # synthetic (33 leaves)
    seed: int = 0                           # synthetic

    @classmethod
    def paper(cls, **overrides) -> "PretrainingData":
        """The paper's scale where synthetic: 100 images per leaf."""
        return cls(**{"images_per_leaf": 100, **overrides})


@dataclass
class TaskData:
    """The downstream tasks: `task_dirs` (real tasks in the RadImageNet repository's fold-CSV
    format) or, when empty, the synthetic tasks `names`, `images` each (None: the sizes of the
    paper's real sets), with `folds` stratified folds."""

    task_dirs: list = field(default_factory=list)
    names: tuple = TASKS
    images: int | None = 200
    folds: int = 5
    seed: int = 0

    @classmethod
    def paper(cls, **overrides) -> "TaskData":
        return cls(**{"images": None, **overrides})


def parse_field_columns(text: str | None) -> dict | None:
    """``"modality=mod,anatomy=body_part"`` -> ``{"modality": "mod", "anatomy": "body_part"}``."""
    if not text:
        return None
    pairs = [pair.split("=", 1) for pair in text.split(",")]
    bad = [p[0] for p in pairs if len(p) != 2 or not p[0].strip() or not p[1].strip()]
    if bad:
        raise ValueError(f"field columns must be field=column pairs separated by commas; got {text!r}")
    return {name.strip(): column.strip() for name, column in pairs}


def choose_vocabulary(path: str | None = None, unknown: str = "error") -> LabelVocabulary:
    """The vocabulary saved at `path`, or the paper's 12 columns with unknown-value policy
    `unknown`."""
    return LabelVocabulary.load(path) if path else paper_vocabulary(unknown)


def load_pretraining_images(source: PretrainingData, image_size: int, vocabulary: LabelVocabulary,
                            log=print) -> ImageSet:
    """The pretraining images at `image_size` px, real or synthetic."""
    if source.root:
        records = read_any(source.root, source.path_column, source.field_columns,
                           source.leaf_column, source.us_fallback, log)
        vocabulary.encode_many([r.fields for r in records], [r.source for r in records])
        log(f"reading {len(records)} images from {source.root} at {image_size} px")
        return load_image_set(records, image_size)
    log(f"generating the SYNTHETIC mini-RadImageNet: {source.images_per_leaf} images x "
        f"{len(COMBINATIONS) * len(PATHOLOGIES)} leaves at {image_size} px")
    return make_pretraining_set(source.images_per_leaf, image_size, source.seed)


def load_downstream_tasks(source: TaskData, image_size: int, log=print) -> list[DownstreamTask]:
    """The downstream tasks at `image_size` px, real or synthetic."""
    if source.task_dirs:
        tasks = [load_downstream_task(d, image_size) for d in source.task_dirs]
        for t in tasks:
            log(f"task {t.name}: {len(t.targets)} images, {len(t.folds)} folds (from {t.name}/dataframe)")
        return tasks
    tasks = []
    for name in source.names:
        n = source.images or PAPER_TASK_SIZES[name]
        tasks.append(make_downstream_task(name, n, image_size, source.seed, source.folds))
        log(f"task {name}: {n} SYNTHETIC images at {image_size} px, {source.folds} stratified folds")
    return tasks
