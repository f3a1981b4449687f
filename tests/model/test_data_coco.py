"""The partially-supervised COCO loader: novel masks and empty segmentations never become masks."""
import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from model.data.coco import PartiallySupervisedCoco
from model.data.splits import VOC_CLASSES, resolve_base_names
from PIL import Image

H, W = 40, 60


def _square_rle(x0, y0, x1, y1):
    m = np.zeros((H, W), np.uint8)
    m[y0:y1, x0:x1] = 1
    rle = mask_utils.encode(np.asfortranarray(m))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


@pytest.fixture
def coco_files(tmp_path):
    Image.fromarray(np.full((H, W, 3), 128, np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.full((H, W, 3), 64, np.uint8)).save(tmp_path / "b.png")
    anns = [
        # person (VOC): polygon mask
        {"category_id": 1, "bbox": [5, 5, 10, 20], "segmentation": [[5, 5, 15, 5, 15, 25, 5, 25]]},
        # dog (VOC): RLE mask
        {"category_id": 18, "bbox": [20, 10, 10, 10], "segmentation": _square_rle(20, 10, 30, 20)},
        # giraffe (not VOC): a real mask that the nonvoc side may use
        {"category_id": 25, "bbox": [35, 5, 20, 20], "segmentation": _square_rle(35, 5, 55, 25)},
        # person with an empty segmentation, person without one
        {"category_id": 1, "bbox": [2, 28, 10, 10], "segmentation": []},
        {"category_id": 1, "bbox": [40, 28, 10, 10]},
        # a crowd region: ignored for training
        {"category_id": 1, "bbox": [0, 0, 60, 40], "segmentation": _square_rle(0, 0, 60, 40), "iscrowd": 1},
    ]
    for i, a in enumerate(anns):
        a.update(id=i + 1, image_id=1, area=a["bbox"][2] * a["bbox"][3], iscrowd=a.get("iscrowd", 0))
    data = {
        "images": [{"id": 1, "file_name": "a.png", "height": H, "width": W},
                   {"id": 2, "file_name": "b.png", "height": H, "width": W}],
        "annotations": anns,
        "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}, {"id": 25, "name": "giraffe"}],
    }
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    return str(tmp_path), str(path)


def _by_box(target):
    return {tuple(round(v) for v in b.tolist()): i for i, b in enumerate(target["boxes"])}


def test_voc_split_keeps_only_voc_masks(coco_files):
    ds = PartiallySupervisedCoco(*coco_files, base="voc")
    assert ds.cat_names == ["person", "dog", "giraffe"] and ds.num_classes == 4
    assert ds.base_cat_ids == [1, 18] and ds.novel_cat_ids == [25]
    assert ds.is_base_label().tolist() == [False, True, True, False]
    # removed as soon as the file is loaded: no later code can read the novel mask
    assert "segmentation" not in ds.coco.anns[3]
    image, target = ds[0]
    assert image.shape == (3, H, W) and image.dtype == torch.float32
    assert len(target["boxes"]) == 5  # the crowd region is left out
    idx = _by_box(target)
    masks, has_mask = target["masks"], target["has_mask"]
    person, dog, giraffe = idx[(5, 5, 15, 25)], idx[(20, 10, 30, 20)], idx[(35, 5, 55, 25)]
    empty, missing = idx[(2, 28, 12, 38)], idx[(40, 28, 50, 38)]
    assert has_mask[person] and has_mask[dog]
    assert masks[person].sum() > 150 and masks[dog].sum() == 100
    for box_only in (giraffe, empty, missing):
        assert not has_mask[box_only] and masks[box_only].sum() == 0
    assert target["labels"][giraffe] == 3 and target["labels"][dog] == 2


def test_nonvoc_split_and_user_lists(coco_files):
    ds = PartiallySupervisedCoco(*coco_files, base="nonvoc")
    assert ds.base_cat_ids == [25]
    _, target = ds[0]
    idx = _by_box(target)
    assert target["has_mask"][idx[(35, 5, 55, 25)]] and not target["has_mask"][idx[(20, 10, 30, 20)]]
    assert PartiallySupervisedCoco(*coco_files, base=["dog"]).base_cat_ids == [18]
    with pytest.raises(ValueError, match="cat"):
        PartiallySupervisedCoco(*coco_files, base=["cat"])


def test_unannotated_images_drop_only_in_training(coco_files):
    assert len(PartiallySupervisedCoco(*coco_files, base="voc")) == 2
    assert len(PartiallySupervisedCoco(*coco_files, base="voc", remove_images_without_annotations=True)) == 1


def test_flip_mirrors_boxes_and_masks_together(coco_files):
    ds = PartiallySupervisedCoco(*coco_files, base="all")
    image, target = ds[0]
    fimage, ftarget = ds[(0, True)]
    assert torch.equal(fimage, image.flip(-1))
    for box, mask, has in zip(ftarget["boxes"], ftarget["masks"], ftarget["has_mask"]):
        if has:
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert box.tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
    assert torch.equal(ftarget["boxes"][:, 0], W - target["boxes"][:, 2])


def test_builtin_voc_split_has_the_twenty_classes():
    assert len(VOC_CLASSES) == 20
    coco_names = VOC_CLASSES + ["giraffe", "zebra"]
    assert resolve_base_names("voc", coco_names) == VOC_CLASSES
    assert resolve_base_names("nonvoc", coco_names) == ["giraffe", "zebra"]
    with pytest.raises(ValueError):
        resolve_base_names("coco", coco_names)
