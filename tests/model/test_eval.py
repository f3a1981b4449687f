"""COCO evaluation split into novel and base categories; the paper's six columns."""
import copy

import pytest

from model.data import shapes
from model.data.build import build_dataset
from model.data.coco import load_coco
from model.evaluate import COLUMNS, evaluate_results, format_table, in_percent
from tiny_model import TINY_CONFIG

SHAPES = {"num_train": 2, "num_val": 6, "image_size": 96, "min_objects": 2, "max_objects": 5, "clutter": 4,
        "min_scale": 0.2, "max_scale": 0.9}


def shapes_val_set(root, sizes):
    """(dataset, COCO ground truth) of the validation split of shapes data of these sizes, made in root."""
    shapes.ensure_shapes_dataset(root, **sizes)
    data_cfg = {"kind": "shapes", "root": root, "base": "shapes", "shapes": sizes}
    return build_dataset(data_cfg, "val"), load_coco(shapes.annotation_path(root, "val", sizes))


@pytest.fixture(scope="module")
def val_set(tmp_path_factory):
    return shapes_val_set(str(tmp_path_factory.mktemp("shapes")), SHAPES)


def ground_truth_as_results(coco_gt):
    bbox, segm = [], []
    for ann in coco_gt.anns.values():
        common = {"image_id": ann["image_id"], "category_id": ann["category_id"], "score": 1.0}
        bbox.append(dict(common, bbox=list(ann["bbox"])))
        segm.append(dict(common, segmentation=copy.deepcopy(ann["segmentation"])))
    return bbox, segm


def evaluate_on(val_set, bbox, segm):
    """evaluate_results of these detections on every image of the set, split into its base and novel categories."""
    dataset, coco_gt = val_set
    return evaluate_results(coco_gt, sorted(coco_gt.imgs), bbox, segm, dataset.base_cat_ids, dataset.novel_cat_ids)


def test_ground_truth_predictions_score_ap_one(val_set):
    bbox, segm = ground_truth_as_results(val_set[1])
    metrics = evaluate_on(val_set, bbox, segm)
    sizes_seen = set()
    for split in ("novel", "base"):
        for kind in ("segm", "bbox"):
            m = metrics[split][kind]
            assert list(m) == COLUMNS
            for column in ("mAP", "AP50", "AP75"):
                assert m[column] == pytest.approx(1.0, abs=1e-12), (split, kind, m)
            for size in ("APs", "APm", "APl"):
                if m[size] != -1.0:  # -1: no ground truth of that size
                    assert m[size] == pytest.approx(1.0, abs=1e-12), (split, kind, m)
                    sizes_seen.add(size)
    assert len(sizes_seen) >= 2


def test_wrong_predictions_score_below_one(val_set):
    dataset, coco_gt = val_set
    bbox, segm = ground_truth_as_results(coco_gt)
    novel = set(dataset.novel_cat_ids)
    # drop half the novel detections and shift every base box: novel recall and base IoU both fall
    kept_novel = [r for i, r in enumerate(bbox) if r["category_id"] not in novel or i % 2]
    shifted = [dict(r, bbox=[r["bbox"][0] + r["bbox"][2] / 2] + r["bbox"][1:]) if r["category_id"] not in novel else r
               for r in kept_novel]
    metrics = evaluate_on(val_set, shifted, [])
    assert metrics["novel"]["bbox"]["mAP"] < 1.0
    assert metrics["base"]["bbox"]["AP50"] < 0.2
    # nothing predicted at all: AP 0 where there is ground truth, -1 (no such objects) elsewhere
    assert {v for v in metrics["novel"]["segm"].values()} <= {0.0, -1.0}
    assert metrics["novel"]["segm"]["mAP"] == 0.0


@pytest.fixture(scope="module")
def small_images(tmp_path_factory):
    """64-pixel images: no object can be large (area > 96^2)."""
    return shapes_val_set(str(tmp_path_factory.mktemp("shapes64")), dict(SHAPES, image_size=64))


def test_sizes_without_ground_truth_print_a_dash(small_images):
    bbox, segm = ground_truth_as_results(small_images[1])
    for segm_results in (segm, []):  # detections; none at all
        metrics = evaluate_on(small_images, bbox, segm_results)
        for split in ("novel", "base"):
            for kind in ("segm", "bbox"):
                assert metrics[split][kind]["APl"] == -1.0, (split, kind, metrics[split][kind])
        assert metrics["novel"]["segm"]["mAP"] == (1.0 if segm_results else 0.0)
        for row in format_table(in_percent(metrics)).splitlines()[2:]:
            segm_cells, bbox_cells = row.split("|")[1:]
            assert segm_cells.split()[-1] == "-" and bbox_cells.split()[-1] == "-", row


def test_table_prints_percent_and_dashes():
    metrics = {"novel": {"segm": dict(zip(COLUMNS, [0.351, 0.608, 0.357, 0.172, 0.347, -1.0])), "bbox": None},
               "base": {"segm": dict.fromkeys(COLUMNS, 1.0), "bbox": dict.fromkeys(COLUMNS, 0.0)}}
    table = format_table(in_percent(metrics))
    lines = table.splitlines()
    assert "mAP  AP50  AP75   APs   APm   APl" in lines[1]
    assert lines[2].startswith("novel") and " 35.1  60.8  35.7  17.2  34.7     -" in lines[2]
    assert lines[3].startswith("base") and "100.0" in lines[3]


@pytest.mark.parametrize("flag, progress", [([], True), (["--no-progress"], False)])
def test_no_progress_turns_the_progress_bar_off(monkeypatch, capsys, flag, progress):
    from model import evaluate as evaluate_script

    seen = {}

    def fake_evaluate(cfg, checkpoint_path=None, device=None, progress=True, out_path=None, gt_boxes=False):
        seen["progress"] = progress
        return {"novel_categories": [], "base_categories": [], "images": 0, "checkpoint": "c", "iteration": 0,
                "metrics_percent": {}}

    monkeypatch.setattr(evaluate_script, "evaluate", fake_evaluate)
    evaluate_script.main(["--config", TINY_CONFIG, *flag])
    assert seen == {"progress": progress}
