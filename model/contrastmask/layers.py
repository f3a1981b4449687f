"""Layers the heads and the backbone share."""
from torch import nn


def group_norm(num_channels, groups=32):
    return nn.GroupNorm(min(groups, num_channels), num_channels)


def conv_relu_stack(in_channels, channels, num_layers, kernel_size=3, norm=None):
    """num_layers x (Conv kxk [-> GroupNorm] -> ReLU); norm: None or "gn"."""
    layers = []
    for i in range(num_layers):
        layers.append(nn.Conv2d(in_channels if i == 0 else channels, channels, kernel_size,
                                padding=kernel_size // 2, bias=norm is None))
        if norm == "gn":
            layers.append(group_norm(channels))
        elif norm is not None:
            raise ValueError(f"head_norm must be None or 'gn', got {norm!r}")
        layers.append(nn.ReLU(inplace=True))
    for m in layers:
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return nn.Sequential(*layers)
