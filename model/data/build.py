"""Datasets from the "data" section of a config: generated shapes or COCO files on disk."""
from . import shapes
from .coco import PartiallySupervisedCoco


def dataset_files(data_cfg, split):
    """(image folder, annotation file) of split "train" or "val"."""
    if data_cfg["kind"] == "shapes":
        params = data_cfg["shapes"]
        return shapes.image_dir(data_cfg["root"], split, params), shapes.annotation_path(data_cfg["root"], split, params)
    if data_cfg["kind"] == "coco":
        return data_cfg[f"{split}_images"], data_cfg[f"{split}_annotations"]
    raise ValueError(f"unknown data kind {data_cfg['kind']!r}: use coco or shapes")


def prepare_data(data_cfg):
    """Generates the shapes dataset if it is not cached yet (call on one process only)."""
    if data_cfg["kind"] == "shapes":
        shapes.ensure_shapes_dataset(data_cfg["root"], **data_cfg["shapes"])


def build_dataset(data_cfg, split):
    images, annotations = dataset_files(data_cfg, split)
    return PartiallySupervisedCoco(images, annotations, base=data_cfg["base"],
                                   remove_images_without_annotations=(split == "train"))
