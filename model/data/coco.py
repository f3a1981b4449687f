"""COCO-format instance segmentation with a partially-supervised split (pycocotools).

Every category keeps its boxes; only base categories keep masks. Masks of novel categories are
deleted from the annotations as soon as the file is loaded, so no later code can read them. Any
annotation whose segmentation is missing or empty (or decodes to no pixel) is box-only as well,
whatever its category: such instances get an all-zero mask row and has_mask = False, which turns
their mask loss off and lets the contrastive loss use their CAM instead.
"""
import contextlib
import io
import os

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from .splits import resolve_base_names
from .transforms import hflip, to_tensor


def load_coco(ann_file):
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        return COCO(ann_file)


def has_segmentation(segm):
    if not segm:
        return False
    if isinstance(segm, list):  # polygons: at least one with three points
        return any(isinstance(p, list) and len(p) >= 6 for p in segm)
    if isinstance(segm, dict):  # RLE
        return bool(segm.get("counts")) and "size" in segm
    return False


def decode_mask(segm, height, width):
    """uint8 (height, width) mask of a polygon list or an (un)compressed RLE."""
    if isinstance(segm, list):
        rle = mask_utils.merge(mask_utils.frPyObjects([p for p in segm if len(p) >= 6], height, width))
    elif isinstance(segm["counts"], list):
        rle = mask_utils.frPyObjects(segm, height, width)
    else:
        rle = segm
    return mask_utils.decode(rle)


class PartiallySupervisedCoco(torch.utils.data.Dataset):
    """Images and targets for torchvision detection models.

    target: boxes (N, 4) float xyxy, labels (N,) int64 in 1..K, masks (N, H, W) uint8 (zero rows for
    box-only instances), has_mask (N,) bool, image_id int64. Dataset keys are an index or an
    (index, flip) pair, so augmentation is decided by the sampler, never by worker RNG state.
    """

    def __init__(self, image_dir, ann_file, base="all", remove_images_without_annotations=False):
        self.image_dir = image_dir
        self.coco = load_coco(ann_file)
        cats = sorted(self.coco.loadCats(self.coco.getCatIds()), key=lambda c: c["id"])
        self.cat_ids = [c["id"] for c in cats]
        self.cat_names = [c["name"] for c in cats]
        self.cat_id_to_label = {cid: i + 1 for i, cid in enumerate(self.cat_ids)}
        base_names = set(resolve_base_names(base, self.cat_names))
        self.base_cat_ids = [c["id"] for c in cats if c["name"] in base_names]
        self.novel_cat_ids = [c["id"] for c in cats if c["name"] not in base_names]
        self._drop_novel_masks()
        ids = sorted(self.coco.imgs)
        if remove_images_without_annotations:
            ids = [i for i in ids if self._annotations(i)]
        self.ids = ids

    def _drop_novel_masks(self):
        novel = set(self.novel_cat_ids)
        for ann in self.coco.dataset.get("annotations", []):
            if ann["category_id"] in novel:
                ann.pop("segmentation", None)

    def _annotations(self, image_id):
        anns = self.coco.loadAnns(self.coco.getAnnIds(imgIds=image_id))
        return [a for a in anns if not a.get("iscrowd", 0) and a["bbox"][2] > 1 and a["bbox"][3] > 1]

    @property
    def num_classes(self):
        """Foreground categories + background."""
        return len(self.cat_ids) + 1

    def is_base_label(self):
        """(num_classes,) bool: label -> base category (index 0, background, is False)."""
        flags = torch.zeros(self.num_classes, dtype=torch.bool)
        for cid in self.base_cat_ids:
            flags[self.cat_id_to_label[cid]] = True
        return flags

    def __len__(self):
        return len(self.ids)

    def load_image(self, index):
        info = self.coco.imgs[self.ids[index]]
        return Image.open(os.path.join(self.image_dir, info["file_name"]))

    def __getitem__(self, key):
        index, flip = key if isinstance(key, tuple) else (key, False)
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        image = to_tensor(self.load_image(index))
        height, width = image.shape[-2:]
        boxes, labels, masks, has_mask = [], [], [], []
        for ann in self._annotations(image_id):
            x, y, w, h = ann["bbox"]
            box = [max(x, 0.0), max(y, 0.0), min(x + w, width), min(y + h, height)]
            if box[2] <= box[0] or box[3] <= box[1]:
                continue
            segm = ann.get("segmentation")
            mask = decode_mask(segm, info["height"], info["width"]) if has_segmentation(segm) else None
            if mask is not None and mask.shape != (height, width):
                raise ValueError(f"image {image_id}: mask size {mask.shape} != image size {(height, width)}")
            boxes.append(box)
            labels.append(self.cat_id_to_label[ann["category_id"]])
            has_mask.append(mask is not None and bool(mask.any()))
            masks.append(mask if has_mask[-1] else np.zeros((height, width), np.uint8))
        target = {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "masks": torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, height, width), torch.uint8),
            "has_mask": torch.tensor(has_mask, dtype=torch.bool),
            "image_id": torch.tensor(image_id, dtype=torch.int64),
        }
        if flip:
            image, target = hflip(image, target)
        return image, target
