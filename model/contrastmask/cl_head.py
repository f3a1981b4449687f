"""Contrastive learning head (Sec. 3.2, Fig. 3): encoder f of n 3x3 Conv-ReLU layers and projector g,
an m-layer per-pixel MLP (1x1 convs) whose last layer has no ReLU. "CnFm" in Table 3; C8F3 default.

Two options of the authors' released code, off by default (the paper does not describe them):
- projector_norm "bn": BatchNorm after each hidden projector layer (their `fc_norm_cfg`);
- enhance: the Y handed to the mask head is a non-local enhancement of f(x) -- every pixel replaced by
  the softmax(cosine)-weighted mean of the ROI's pixels (their `enhance_op`); Z is computed from f(x).
"""
import torch
import torch.nn.functional as F
from torch import nn

from .layers import conv_relu_stack

PROJECTOR_NORMS = (None, "bn")


def non_local_enhance(y):
    """(N, C, H, W) -> (N, C, H, W): each pixel the mean of all pixels of its ROI weighted by the softmax of
    their cosine similarity to it."""
    n, c, h, w = y.shape
    flat = y.reshape(n, c, h * w)
    unit = F.normalize(flat, dim=1)
    weights = torch.bmm(unit.transpose(1, 2), unit).softmax(dim=-1)  # (N, HW, HW)
    return torch.bmm(flat, weights.transpose(1, 2)).reshape(n, c, h, w)


class CLHead(nn.Module):
    def __init__(self, in_channels, channels, num_convs=8, num_fcs=3, norm=None, projector_norm=None,
                 enhance=False):
        super().__init__()
        if num_convs < 1 or num_fcs < 1:
            raise ValueError("the CL head needs at least one encoder conv and one projector layer")
        if projector_norm not in PROJECTOR_NORMS:
            raise ValueError(f"cl_projector_norm must be one of {PROJECTOR_NORMS}, got {projector_norm!r}")
        self.encoder = conv_relu_stack(in_channels, channels, num_convs, norm=norm)
        projector = []
        for i in range(num_fcs):
            hidden = i < num_fcs - 1
            projector.append(nn.Conv2d(channels, channels, 1, bias=not (hidden and projector_norm)))
            if hidden:
                if projector_norm == "bn":
                    projector.append(nn.BatchNorm2d(channels))
                projector.append(nn.ReLU(inplace=True))
        self.projector = nn.Sequential(*projector)
        self.enhance = enhance
        self.out_channels = channels

    def forward(self, x, project=True):
        """x (N, C_in, H, W) ROI features -> Y (N, C, H, W) for the mask head and Z = g(f(x)) (or None)."""
        y = self.encoder(x)
        z = self.projector(y) if project else None
        return (non_local_enhance(y) if self.enhance else y), z
