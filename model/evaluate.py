"""COCO evaluation of a trained model, on the novel and on the base categories separately.

    python -m model.evaluate --config model/configs/demo.json [--checkpoint runs/demo/checkpoint.pt]
    python -m model.evaluate --config model/configs/demo.json --gt-boxes    # + mask head on true boxes

Prints mask AP (segm) and box AP (bbox) as the paper's columns (mAP, AP50, AP75, APs, APm, APl, in
percent; "-" where no ground truth of that size exists) and saves them to output_dir/eval.json.
--gt-boxes adds the mask head's quality on the ground-truth boxes and the CAM diagnostics
(model/gt_box_eval.py): mask AP and mean IoU, CAM foreground/background AUC, pseudo-label purity.

The model is built from the config saved in the checkpoint (the one it was trained with), so a --set that
changes a model.* key could not take effect: it is an error (exit status 2) rather than silently ignored.
The data, eval and output keys of --config and --set apply.
"""
import contextlib
import copy
import io
import json
import os

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from tqdm import tqdm

from .config import ConfigError, config_from_args, exit_on_config_error, load_or_exit, script_parser
from .contrastmask import build_model
from .data.build import build_dataset, dataset_files
from .data.coco import load_coco
from .data.loader import eval_loader
from .data.splits import resolve_base_names
from .engine import checkpoint as ckpt
from .gt_box_eval import format_gt_table, run_on_gt_boxes

COLUMNS = ["mAP", "AP50", "AP75", "APs", "APm", "APl"]


def to_coco_results(output, image_id, cat_ids):
    """One image's detections -> (bbox results, segm results) in COCO's result format."""
    boxes = output["boxes"].cpu()
    scores = output["scores"].cpu().tolist()
    labels = output["labels"].cpu().tolist()
    masks = (output["masks"][:, 0] > 0.5).cpu().numpy().astype(np.uint8) if "masks" in output else None
    bbox_results, segm_results = [], []
    for k, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
        common = {"image_id": image_id, "category_id": cat_ids[labels[k] - 1], "score": scores[k]}
        bbox_results.append(dict(common, bbox=[x1, y1, x2 - x1, y2 - y1]))
        if masks is not None:
            rle = mask_utils.encode(np.asfortranarray(masks[k]))
            rle["counts"] = rle["counts"].decode("ascii")
            segm_results.append(dict(common, segmentation=rle))
    return bbox_results, segm_results


@torch.no_grad()
def predict(model, dataset, device, batch_size=8, max_images=None, progress=True):
    """Runs the model over the dataset; returns (image ids, bbox results, segm results)."""
    model.eval()
    if max_images is not None and max_images < len(dataset):
        dataset = torch.utils.data.Subset(dataset, range(max_images))
    image_ids, bbox_results, segm_results = [], [], []
    base = dataset.dataset if isinstance(dataset, torch.utils.data.Subset) else dataset
    for images, targets in tqdm(eval_loader(dataset, batch_size, num_workers=0), desc="evaluate",
                                disable=not progress, dynamic_ncols=True):
        outputs = model([img.to(device) for img in images])
        for out, target in zip(outputs, targets):
            image_id = int(target["image_id"])
            image_ids.append(image_id)
            b, s = to_coco_results(out, image_id, base.cat_ids)
            bbox_results += b
            segm_results += s
    return image_ids, bbox_results, segm_results


def no_detections(coco_gt):
    """An empty result set for COCOeval (COCO's loadRes cannot take an empty list): the images, no annotations."""
    empty = COCO()
    empty.dataset = {"images": list(coco_gt.dataset["images"]),
                     "categories": copy.deepcopy(coco_gt.dataset["categories"]), "annotations": []}
    empty.createIndex()
    return empty


def coco_metrics(coco_gt, results, iou_type, cat_ids, image_ids):
    """The six summary numbers (fractions; -1 where COCO has no ground truth of that size)."""
    results = [r for r in results if r["category_id"] in set(cat_ids)]
    if not cat_ids:
        return None
    with contextlib.redirect_stdout(io.StringIO()):
        # Nothing detected is still evaluated, so a size with no ground truth stays -1 ("-"), not AP 0.
        coco_dt = coco_gt.loadRes(results) if results else no_detections(coco_gt)
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        evaluator.params.catIds = list(cat_ids)
        evaluator.params.imgIds = list(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return dict(zip(COLUMNS, (float(v) for v in evaluator.stats[:6])))


def evaluate_results(coco_gt, image_ids, bbox_results, segm_results, base_cat_ids, novel_cat_ids):
    """{"novel": {"segm": {...}, "bbox": {...}}, "base": {...}} of fractions."""
    out = {}
    for split, cat_ids in (("novel", novel_cat_ids), ("base", base_cat_ids)):
        out[split] = {"segm": coco_metrics(coco_gt, segm_results, "segm", cat_ids, image_ids),
                      "bbox": coco_metrics(coco_gt, bbox_results, "bbox", cat_ids, image_ids)}
    return out


def in_percent(metrics):
    """Fractions -> the paper's percent with one decimal; COCO's -1 (no such objects) -> None."""
    if isinstance(metrics, dict):
        return {k: in_percent(v) for k, v in metrics.items()}
    if metrics is None or metrics < 0:
        return None
    return round(100 * metrics, 1)


def format_table(metrics_percent):
    cell = lambda v: f"{v:5.1f}" if v is not None else "    -"  # noqa: E731
    head = " ".join(f"{c:>5}" for c in COLUMNS)
    lines = [f"{'':8}| {'mask AP (segm)':^35} | {'box AP (bbox)':^35}", f"{'split':8}| {head} | {head}"]
    for split in ("novel", "base"):
        row = metrics_percent.get(split, {})
        parts = []
        for kind in ("segm", "bbox"):
            m = row.get(kind) or {}
            parts.append(" ".join(cell(m.get(c)) for c in COLUMNS))
        lines.append(f"{split:8}| {parts[0]} | {parts[1]}")
    return "\n".join(lines)


def load_trained_model(cfg, checkpoint_path, dataset, device):
    """The model is built from the config saved in the checkpoint (the one it was trained with)."""
    state = ckpt.load(checkpoint_path)
    trained_cfg = state.get("config", cfg)
    trained_base = set(resolve_base_names(trained_cfg["data"]["base"], dataset.cat_names))
    scored_base = {dataset.cat_names[dataset.cat_ids.index(c)] for c in dataset.base_cat_ids}
    if trained_base != scored_base:
        raise ValueError(f"{checkpoint_path} was trained with base categories {sorted(trained_base)}, but this "
                         f"evaluation scores {sorted(scored_base)} as base: set data.base to the training split")
    model = build_model(trained_cfg["model"], trained_cfg["contrast"], dataset.num_classes)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), state.get("iteration")


def evaluate(cfg, checkpoint_path=None, device=None, progress=True, out_path=None, gt_boxes=False):
    """Evaluates output_dir/checkpoint.pt (or checkpoint_path); writes eval.json; returns its record.
    gt_boxes: also the mask head on the ground-truth boxes (record["gt_boxes"], fractions)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    checkpoint_path = checkpoint_path or os.path.join(cfg["output_dir"], "checkpoint.pt")
    dataset = build_dataset(cfg["data"], "val")
    model, iteration = load_trained_model(cfg, checkpoint_path, dataset, device)
    image_ids, bbox_results, segm_results = predict(model, dataset, device, cfg["eval"]["images_per_batch"],
                                                    cfg["eval"]["max_images"], progress)
    coco_gt = load_coco(dataset_files(cfg["data"], "val")[1])  # the file's masks, novel ones included
    metrics = evaluate_results(coco_gt, image_ids, bbox_results, segm_results,
                               dataset.base_cat_ids, dataset.novel_cat_ids)
    names = dict(zip(dataset.cat_ids, dataset.cat_names))
    record = {"checkpoint": checkpoint_path, "iteration": iteration, "images": len(image_ids),
              "novel_categories": [names[c] for c in dataset.novel_cat_ids],
              "base_categories": [names[c] for c in dataset.base_cat_ids],
              "metrics": metrics, "metrics_percent": in_percent(metrics)}
    if gt_boxes:
        record["gt_boxes"] = run_on_gt_boxes(model, dataset, coco_gt, device, cfg["eval"]["images_per_batch"],
                                             cfg["eval"]["max_images"], cfg["contrast"]["delta"], progress)
    out_path = out_path or os.path.join(cfg["output_dir"], "eval.json")
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(record, f, indent=2)
    return record


def model_keys_changed_by(config_path, overrides):
    """The model.* keys whose value the overrides change (a preset among them included), sorted."""
    before, after = load_or_exit(config_path)["model"], load_or_exit(config_path, overrides)["model"]
    return [f"model.{key}" for key in sorted(after) if after[key] != before[key]]


def refuse_model_overrides(args, script):
    """A script that loads a trained model (load_trained_model) builds it from the checkpoint's config: a --set
    of a model.* key could not take effect, so it ends the program (status 2) instead of being ignored."""
    changed = model_keys_changed_by(args.config, args.set)
    if changed:
        exit_on_config_error(ConfigError(
            f"--set {', '.join(changed)}: {script} builds the model from the checkpoint's config, so model.* "
            f"overrides cannot take effect; leave them out"))


def trained_model_parser(doc, default_out):
    """The arguments of a script that loads a trained model: the shared ones, --checkpoint and --out."""
    p = script_parser(doc)
    p.add_argument("--checkpoint", help="default: output_dir/checkpoint.pt")
    p.add_argument("--out", help=f"default: output_dir/{default_out}")
    return p


def trained_model_config(args, script):
    """The config of a script that loads a trained model, after refuse_model_overrides."""
    cfg = config_from_args(args)
    refuse_model_overrides(args, script)
    return cfg


def main(argv=None):
    p = trained_model_parser(__doc__, "eval.json")
    p.add_argument("--gt-boxes", action="store_true", help="also run the mask head on the ground-truth boxes")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    cfg = trained_model_config(args, "evaluate")
    record = evaluate(cfg, args.checkpoint, args.device, progress=not args.no_progress, out_path=args.out,
                      gt_boxes=args.gt_boxes)
    print(f"novel: {', '.join(record['novel_categories'])}\nbase:  {', '.join(record['base_categories'])}")
    print(f"{record['images']} images, checkpoint {record['checkpoint']} (iteration {record['iteration']})")
    print(format_table(record["metrics_percent"]))
    if "gt_boxes" in record:
        print("\non ground-truth boxes (percent):")
        print(format_gt_table(record["gt_boxes"]))


if __name__ == "__main__":
    main()
