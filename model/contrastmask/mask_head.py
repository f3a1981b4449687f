"""Class-agnostic mask head (Sec. 3.4, Fig. 5): torchvision's Mask R-CNN mask head with one output
channel, whose input is X + 1x1conv(Y resized to X's size) + CAM resized to X's size.

The paper says the CL output is "concatenated"; the authors' code adds it after a 1x1 conv, and the
CAM (one channel) is added to every channel of X. This follows the code.
"""
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

from .layers import group_norm


class ClassAgnosticMaskHead(nn.Module):
    def __init__(self, in_channels, channels, num_convs, cl_channels=None, norm=None):
        super().__init__()
        self.fuse = nn.Conv2d(cl_channels, in_channels, 1) if cl_channels else None
        if self.fuse is not None:
            nn.init.kaiming_normal_(self.fuse.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(self.fuse.bias)
        self.convs = MaskRCNNHeads(in_channels, [channels] * num_convs, 1, norm_layer=group_norm if norm else None)
        self.predictor = MaskRCNNPredictor(channels if num_convs else in_channels, channels, 1)
        # torchvision's fan_out init gives a single output channel std sqrt(2): logits of +-10 at start
        nn.init.normal_(self.predictor.mask_fcn_logits.weight, std=0.001)
        nn.init.zeros_(self.predictor.mask_fcn_logits.bias)

    def forward(self, x, cl_features=None, cams=None):
        """x (N, C, S, S); cl_features (N, C', S', S') or None; cams (N, S, S) in [0, 1] or None.
        Returns mask logits (N, 1, 2S, 2S)."""
        if cl_features is not None:
            y = F.interpolate(cl_features, size=x.shape[-2:], mode="bilinear", align_corners=False)
            x = x + self.fuse(y)
        if cams is not None:
            x = x + cams[:, None].to(x.dtype)
        return self.predictor(self.convs(x))
