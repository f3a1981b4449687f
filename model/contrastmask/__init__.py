"""ContrastMask (Wang et al., CVPR 2022) on torchvision's Mask R-CNN."""
from .build import build_model

__all__ = ["build_model"]
