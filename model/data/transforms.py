"""Per-sample transforms. Multi-scale resizing is left to the detector's GeneralizedRCNNTransform
(torchvision's min_size tuple, one size drawn per batch); here: tensor conversion and the flip."""
from torchvision.transforms import functional as F


def to_tensor(image):
    """PIL image -> float tensor (3, H, W) in [0, 1]."""
    return F.pil_to_tensor(image.convert("RGB")).float().div_(255.0)


def hflip(image, target):
    """Mirror an image tensor and its target (boxes, masks) left-right."""
    width = image.shape[-1]
    image = image.flip(-1)
    target = dict(target)
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    target["boxes"] = boxes
    if "masks" in target:
        target["masks"] = target["masks"].flip(-1)
    return image, target
