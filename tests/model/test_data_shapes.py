"""The synthetic shapes generator: deterministic files, valid COCO annotations."""
import filecmp
import os

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from model.data import shapes
from model.data.coco import load_coco

SHAPES = {"num_train": 6, "num_val": 3, "image_size": 64, "min_objects": 1, "max_objects": 4, "clutter": 4}


def _files(root):
    out = []
    for dirpath, _, names in os.walk(root):
        out += [os.path.relpath(os.path.join(dirpath, n), root) for n in names]
    return sorted(out)


def test_the_seed_decides_the_files(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    shapes.ensure_shapes_dataset(str(a), **SHAPES)
    shapes.ensure_shapes_dataset(str(b), **SHAPES)
    shapes.ensure_shapes_dataset(str(c), **dict(SHAPES, seed=1))
    files = _files(a)
    assert len(files) == SHAPES["num_train"] + SHAPES["num_val"] + 2  # images + one JSON per split
    assert files == _files(b)
    match, mismatch, errors = filecmp.cmpfiles(a, b, files, shallow=False)
    assert mismatch == [] and errors == []
    other = _files(c)  # another seed: other folders, other pixels
    assert len(other) == len(files)
    assert [open(os.path.join(a, f), "rb").read() for f in files] != [open(os.path.join(c, f), "rb").read() for f in other]


def test_cache_is_reused_per_parameter_set(tmp_path):
    root = str(tmp_path)
    shapes.ensure_shapes_dataset(root, **SHAPES)
    ann = shapes.annotation_path(root, "train", SHAPES)
    stamp = os.stat(ann).st_mtime_ns
    shapes.ensure_shapes_dataset(root, **SHAPES)
    assert os.stat(ann).st_mtime_ns == stamp
    # another validation size never rewrites the training split another run may be reading
    shapes.ensure_shapes_dataset(root, **dict(SHAPES, num_val=2))
    assert os.stat(ann).st_mtime_ns == stamp
    assert shapes.annotation_path(root, "val", dict(SHAPES, num_val=2)) != shapes.annotation_path(root, "val", SHAPES)
    assert len(load_coco(shapes.annotation_path(root, "val", dict(SHAPES, num_val=2))).imgs) == 2
    shapes.ensure_shapes_dataset(root, **dict(SHAPES, num_train=4))
    assert len(load_coco(shapes.annotation_path(root, "train", dict(SHAPES, num_train=4))).imgs) == 4
    assert len(load_coco(ann).imgs) == SHAPES["num_train"]


def test_category_appearance_is_a_family(tmp_path):
    """With appearance "category" the interior colour of an object tells its category; with "free" it
    does not. Measured as the nearest-hue-centre accuracy over many objects."""
    import colorsys

    accuracy = {}
    for appearance in shapes.APPEARANCES:
        params = dict(SHAPES, num_train=40, num_val=1, clutter=0, appearance=appearance)
        root = str(tmp_path / appearance)
        shapes.ensure_shapes_dataset(root, **params)
        coco = load_coco(shapes.annotation_path(root, "train", params))
        hits = total = 0
        for ann in coco.anns.values():
            img = np.asarray(Image.open(os.path.join(shapes.image_dir(root, "train", params),
                                                     coco.imgs[ann["image_id"]]["file_name"])), dtype=np.float64)
            mean = img[coco.annToMask(ann).astype(bool)].mean(0) / 255
            hue = colorsys.rgb_to_hsv(*mean)[0]
            centres = [shapes.CATEGORY_APPEARANCE[name][2] for name in shapes.CATEGORIES]
            nearest = min(range(len(centres)), key=lambda k: min(abs(hue - centres[k]), 1 - abs(hue - centres[k])))
            hits += nearest == ann["category_id"] - 1
            total += 1
        accuracy[appearance] = hits / total
    assert accuracy["category"] > 0.8, accuracy
    assert accuracy["free"] < 0.4, accuracy


def test_unknown_appearance_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="appearance"):
        shapes.ensure_shapes_dataset(str(tmp_path), **dict(SHAPES, appearance="plaid"))


def test_annotations_load_and_match_the_masks(tmp_path):
    root = str(tmp_path)
    shapes.ensure_shapes_dataset(root, **SHAPES)
    coco = load_coco(shapes.annotation_path(root, "train", SHAPES))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == shapes.CATEGORIES
    assert len(coco.imgs) == SHAPES["num_train"]
    assert len(coco.anns) >= SHAPES["num_train"]
    for ann in coco.anns.values():
        img = coco.imgs[ann["image_id"]]
        mask = coco.annToMask(ann)
        assert mask.shape == (img["height"], img["width"])
        assert mask.sum() == ann["area"] >= shapes.MIN_VISIBLE_PIXELS
        ys, xs = np.nonzero(mask)
        assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert ann["iscrowd"] == 0
    # occlusion: visible masks of one image never overlap
    for image_id in coco.imgs:
        masks = [coco.annToMask(a) for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id))]
        if masks:
            assert np.stack(masks).sum(0).max() <= 1


def test_every_category_is_drawn(tmp_path):
    root = str(tmp_path)
    shapes.ensure_shapes_dataset(root, **dict(SHAPES, num_train=40, num_val=1))
    coco = load_coco(shapes.annotation_path(root, "train", dict(SHAPES, num_train=40, num_val=1)))
    assert {a["category_id"] for a in coco.anns.values()} == set(range(1, 11))
    rle = coco.anns[1]["segmentation"]
    assert mask_utils.area(rle) == coco.anns[1]["area"]
