"""modan_ext: fused CPU/CUDA Jaccard-weighted multi-label supervised contrastive loss."""
from ._version import __version__
from .loss import JaccardSupConLoss, jaccard_supcon_loss, resolve_backend
from .ops import kernel_available
from .reference import jaccard_supcon_loss_reference

__all__ = ["JaccardSupConLoss", "jaccard_supcon_loss", "jaccard_supcon_loss_reference",
           "kernel_available", "resolve_backend"]
