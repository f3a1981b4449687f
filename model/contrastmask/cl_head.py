"""Contrastive learning head (Sec. 3.2, Fig. 3): encoder f of n 3x3 Conv-ReLU layers and projector g,
an m-layer per-pixel MLP (1x1 convs) whose last layer has no ReLU. "CnFm" in Table 3; C8F3 default."""
from torch import nn

from .box_head import conv_relu_stack


class CLHead(nn.Module):
    def __init__(self, in_channels, channels, num_convs=8, num_fcs=3, norm=None):
        super().__init__()
        if num_convs < 1 or num_fcs < 1:
            raise ValueError("the CL head needs at least one encoder conv and one projector layer")
        self.encoder = conv_relu_stack(in_channels, channels, num_convs, norm=norm)
        projector = []
        for i in range(num_fcs):
            projector.append(nn.Conv2d(channels, channels, 1))
            if i < num_fcs - 1:
                projector.append(nn.ReLU(inplace=True))
        self.projector = nn.Sequential(*projector)
        self.out_channels = channels

    def forward(self, x, project=True):
        """x (N, C_in, H, W) ROI features -> Y = f(x) (N, C, H, W) and Z = g(Y) (or None)."""
        y = self.encoder(x)
        return y, (self.projector(y) if project else None)
