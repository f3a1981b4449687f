"""Box head whose classification branch ends in global average pooling + a linear classifier, so
that the CAM of class c is the classifier's row c applied at every position of the branch's map."""
import torch
from torch import nn

from .layers import conv_relu_stack


class CamBoxHead(nn.Module):
    """shared convs -> cls convs -> GAP -> cls_score   (the CAM comes from the cls convs' map)
                    -> reg convs -> GAP -> bbox_pred                  (reg_head "gap")
                    -> reg convs -> flatten -> fc -> ReLU -> bbox_pred (reg_head "fc")

    Only the classification branch needs GAP (for the CAM). The authors' released head pools the
    regression branch too ("gap"); "fc" regresses from the flattened map, like torchvision's heads.

    Returns class logits (N, K), box deltas (N, 4K) and the classification map (N, C, h, w).
    """

    def __init__(self, in_channels, channels, num_classes, shared_convs=4, cls_convs=1, reg_convs=2, norm=None,
                 reg_head="gap", roi_size=7, fc_channels=1024, cls_kernel=3):
        super().__init__()
        self.shared = conv_relu_stack(in_channels, channels, shared_convs, norm=norm)
        trunk_channels = channels if shared_convs else in_channels
        # cls_kernel 1: each CAM position sees only its own RoIAlign cell (plus the backbone's context)
        self.cls_convs = conv_relu_stack(trunk_channels, channels, cls_convs, kernel_size=cls_kernel, norm=norm)
        self.reg_convs = conv_relu_stack(trunk_channels, channels, reg_convs, norm=norm)
        cls_channels = channels if cls_convs else trunk_channels
        reg_channels = channels if reg_convs else trunk_channels
        self.cls_score = nn.Linear(cls_channels, num_classes)
        if reg_head == "gap":
            self.reg_fc = None
            self.bbox_pred = nn.Linear(reg_channels, num_classes * 4)
        elif reg_head == "fc":
            self.reg_fc = nn.Sequential(nn.Flatten(), nn.Linear(reg_channels * roi_size * roi_size, fc_channels),
                                        nn.ReLU(inplace=True))
            self.bbox_pred = nn.Linear(fc_channels, num_classes * 4)
        else:
            raise ValueError(f"box_reg_head must be gap or fc, got {reg_head!r}")
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x):
        x = self.shared(x)
        cls_map = self.cls_convs(x)
        class_logits = self.cls_score(cls_map.mean(dim=(2, 3)))
        reg_map = self.reg_convs(x)
        reg_features = reg_map.mean(dim=(2, 3)) if self.reg_fc is None else self.reg_fc(reg_map)
        box_regression = self.bbox_pred(reg_features)
        return class_logits, box_regression, cls_map

    def cams(self, cls_map, labels):
        """Raw CAM (N, h, w) of class labels[n] for ROI n. The classifier's weights are detached (as
        in the released code): the mask loss may shape the CAM's features, not the classifier."""
        weights = self.cls_score.weight.detach()[labels].to(cls_map.dtype)
        return torch.einsum("nchw,nc->nhw", cls_map, weights)
