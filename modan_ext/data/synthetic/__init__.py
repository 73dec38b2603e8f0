"""A deterministic, procedurally generated "mini-RadImageNet" and three downstream tasks.

This is SYNTHETIC data, made so the whole pipeline runs on a fresh machine with nothing
downloaded. It imitates the *structure* of the paper's data, not its content:

* each image is a map of tissue classes drawn from an anatomy-specific scene (head with skull
  and ventricles, knee with femur/tibia/patella, chest with lungs and ribs, ...), with per-image
  random pose, size and shape;
* a modality renders the map: CT with flat tissue values and sharp bone/air edges, MR with smooth
  edges, T1 or T2 contrast and a multiplicative bias field, US inside a fan-shaped sector with
  speckle, depth attenuation and acoustic shadows behind bone and air;
* the modality/anatomy pairs are RadImageNet's (CT: abd, lung; MR: abd, af, brain, hip, knee,
  shoulder, spine; US: abd, thyroid), and each pair has three "pathology" leaves (normal, mass,
  fluid), so the leaf classes play the role of RadImageNet's 165 classes.

Downstream binary tasks reuse the same renderers with a small lesion whose class signal is
subtle and overlapping (`make_downstream_task`): ACL tear on knee MR, malignancy on breast-like
US and on thyroid US, like the paper's three evaluations.

Every image is drawn from its own `numpy.random.Generator` seeded by (seed, set, index), so an
image does not depend on how many others are generated or in which order.
"""
from __future__ import annotations

from .canvas import (AIR, BONE, CALCIFICATION, DENSE_LESION, FAT, FLUID, LESION, LIGAMENT, ORGAN,
                     SOFT)
from .export import export_downstream_task, export_radimagenet_tree
from .mini_radimagenet import contact_sheet, make_image, make_pretraining_set
from .render import render, render_ct, render_mr, render_us
from .scenes import COMBINATIONS, PATHOLOGIES
from .tasks import PAPER_TASK_SIZES, TASKS, make_downstream_task, stratified_folds

__all__ = ["AIR", "BONE", "CALCIFICATION", "COMBINATIONS", "DENSE_LESION", "FAT", "FLUID",
           "LESION", "LIGAMENT", "ORGAN", "PAPER_TASK_SIZES", "PATHOLOGIES", "SOFT", "TASKS",
           "contact_sheet", "export_downstream_task", "export_radimagenet_tree", "make_image",
           "make_downstream_task", "make_pretraining_set", "render", "render_ct", "render_mr",
           "render_us", "stratified_folds"]
