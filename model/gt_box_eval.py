"""Mask quality on ground-truth boxes: the mask head run on the true boxes with the true classes (and
the CAM of the true class), so detection quality drops out and what is left is what ContrastMask's
idea acts on.

For novel and base categories apart it reports
- mask AP (COCO segm, one prediction of score 1 per ground-truth box) and mean mask IoU;
- the CAM's foreground/background AUC: how well the CAM (per ROI, min-max normalised to [0, 1] on the
  28x28 grid the contrastive loss uses) ranks object pixels above background pixels of the same ROIs,
  pooled over every pixel of every ROI of the split; the same AUC for a plain "closeness to the box
  centre" score, as a yardstick any useful CAM must beat, and for the ideal CAM at the box head's
  resolution (the true mask averaged onto the classifier's h x w grid, then resized and normalised
  like a CAM), the ceiling that a CAM of that resolution can reach;
- the purity of the delta-thresholded pseudo-labels that the loss uses for box-only ROIs: of the pixels
  with CAM >= 1 - delta, the fraction that is object; of those with CAM <= delta, the fraction that is
  background (and how many pixels each threshold keeps).
"""
import contextlib
import io

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.cocoeval import COCOeval
from scipy.stats import rankdata
from torchvision.models.detection.roi_heads import project_masks_on_boxes
from tqdm import tqdm

from .contrastmask.cams import resize_cams
from .data.loader import eval_loader

GRID = 28  # the contrastive loss's ROI grid


def auc(scores, positive):
    """Area under the ROC curve of scores for the binary labels positive (ties count one half)."""
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def centre_prior(size):
    """(size, size) score that is highest at the grid's centre (negative squared distance)."""
    t = (torch.arange(size, dtype=torch.float32) + 0.5) / size - 0.5
    return -(t[:, None] ** 2 + t[None, :] ** 2)


def _gt_masks(coco_gt, image_id, cat_id_to_label, height, width):
    """The file's masks (novel included) of the image's annotations, in the dataset's target order."""
    anns = [a for a in coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=image_id))
            if not a.get("iscrowd", 0) and a["bbox"][2] > 1 and a["bbox"][3] > 1]
    masks = []
    for a in anns:
        x, y, w, h = a["bbox"]
        if min(x + w, width) <= max(x, 0.0) or min(y + h, height) <= max(y, 0.0):
            continue
        masks.append(coco_gt.annToMask(a))
    return torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, height, width), torch.uint8)


@torch.no_grad()
def run_on_gt_boxes(model, dataset, coco_gt, device, batch_size=8, max_images=None, delta=0.1, progress=True):
    """Per split ("novel", "base"): mask AP / mean IoU on ground-truth boxes, CAM AUC and pseudo-label
    purity. Returns a dict of plain numbers (fractions)."""
    model.eval()
    heads = model.roi_heads
    if max_images is not None and max_images < len(dataset):
        dataset = torch.utils.data.Subset(dataset, range(max_images))
    base_ds = dataset.dataset if isinstance(dataset, torch.utils.data.Subset) else dataset
    is_base = base_ds.is_base_label()
    segm_results, ious, image_ids = [], {"novel": [], "base": []}, []
    pixels = {split: {"cam": [], "centre": [], "ceiling": [], "fg": []} for split in ("novel", "base")}
    prior = centre_prior(GRID)
    for images, targets in tqdm(eval_loader(dataset, batch_size, num_workers=0), desc="gt boxes",
                                disable=not progress, dynamic_ncols=True):
        sizes = [img.shape[-2:] for img in images]
        full = []
        for t, (h, w) in zip(targets, sizes):
            masks = _gt_masks(coco_gt, int(t["image_id"]), base_ds.cat_id_to_label, h, w)
            if masks.shape[0] != t["boxes"].shape[0]:
                raise RuntimeError(f"image {int(t['image_id'])}: annotations and targets disagree")
            full.append({"boxes": t["boxes"].to(device), "labels": t["labels"].to(device), "masks": masks.to(device)})
        image_list, scaled = model.transform([img.to(device) for img in images], full)
        features = model.backbone(image_list.tensors)
        boxes = [t["boxes"] for t in scaled]
        labels = torch.cat([t["labels"] for t in scaled])
        if labels.numel() == 0:
            continue
        cls_maps = heads.box_head(heads.box_roi_pool(features, boxes, image_list.image_sizes))[2]
        mask_logits, _, _ = heads.mask_forward(features, boxes, image_list.image_sizes, cls_maps, labels,
                                               project=False)
        # CAM of the true class on the loss's grid, whether or not the model feeds it to the mask head
        cams = resize_cams(heads.box_head.cams(cls_maps, labels).float(), GRID).cpu()
        fg = torch.cat([project_masks_on_boxes(t["masks"], b, torch.arange(b.shape[0], device=device), GRID)
                        for t, b in zip(scaled, boxes)]).cpu() >= 0.5
        ceiling = resize_cams(torch.cat([project_masks_on_boxes(t["masks"], b, torch.arange(b.shape[0], device=device),
                                                                cls_maps.shape[-1])
                                         for t, b in zip(scaled, boxes)]).float(), GRID).cpu()
        split_of = ["base" if is_base[int(lab)] else "novel" for lab in labels.cpu()]
        for k, split in enumerate(split_of):
            pixels[split]["cam"].append(cams[k].flatten())
            pixels[split]["centre"].append(prior.flatten())
            pixels[split]["ceiling"].append(ceiling[k].flatten())
            pixels[split]["fg"].append(fg[k].flatten())
        # masks pasted into the original image, as the detector's output would be
        per_image = mask_logits.sigmoid().split([b.shape[0] for b in boxes])
        outputs = [{"boxes": b, "labels": t["labels"], "scores": torch.ones(b.shape[0], device=device), "masks": m}
                   for b, t, m in zip(boxes, scaled, per_image)]
        outputs = model.transform.postprocess(outputs, image_list.image_sizes, sizes)
        k = 0
        for out, t, gt in zip(outputs, targets, full):
            image_id = int(t["image_id"])
            image_ids.append(image_id)
            binary = (out["masks"][:, 0] > 0.5).cpu()
            for j in range(binary.shape[0]):
                pred, true = binary[j], gt["masks"][j].cpu().bool()
                union = (pred | true).sum().item()
                ious[split_of[k]].append((pred & true).sum().item() / union if union else 1.0)
                rle = mask_utils.encode(np.asfortranarray(pred.numpy().astype(np.uint8)))
                rle["counts"] = rle["counts"].decode("ascii")
                segm_results.append({"image_id": image_id, "segmentation": rle, "score": 1.0,
                                     "category_id": base_ds.cat_ids[int(t["labels"][j]) - 1]})
                k += 1
    out = {}
    for split, cat_ids in (("novel", base_ds.novel_cat_ids), ("base", base_ds.base_cat_ids)):
        px = pixels[split]
        if not px["cam"]:
            out[split] = None
            continue
        cam, centre, ceiling, fg = (torch.cat(px[key]).numpy() for key in ("cam", "centre", "ceiling", "fg"))
        high, low = cam >= 1 - delta, cam <= delta
        out[split] = {
            "rois": len(ious[split]),
            "mask_ap": _segm_ap(coco_gt, segm_results, cat_ids, image_ids),
            "mean_iou": float(np.mean(ious[split])),
            "cam_auc": auc(cam, fg),
            "centre_prior_auc": auc(centre, fg),
            "cam_ceiling_auc": auc(ceiling, fg),
            "fg_fraction": float(fg.mean()),
            "pseudo_fg_purity": float(fg[high].mean()) if high.any() else None,
            "pseudo_bg_purity": float((~fg[low]).mean()) if low.any() else None,
            "pseudo_fg_coverage": float(high.mean()),
            "pseudo_bg_coverage": float(low.mean()),
        }
    return out


def _segm_ap(coco_gt, results, cat_ids, image_ids):
    results = [r for r in results if r["category_id"] in set(cat_ids)]
    if not results:
        return 0.0
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(results), "segm")
        evaluator.params.catIds = list(cat_ids)
        evaluator.params.imgIds = sorted(set(image_ids))
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return float(evaluator.stats[0])


def format_gt_table(metrics):
    """A text table of run_on_gt_boxes' numbers, in percent (AUC and purity too)."""
    cols = [("mask_ap", "maskAP"), ("mean_iou", "mIoU"), ("cam_auc", "CAM AUC"), ("centre_prior_auc", "centre AUC"),
            ("cam_ceiling_auc", "ceil. AUC"),
            ("pseudo_fg_purity", "fg purity"), ("pseudo_bg_purity", "bg purity")]
    lines = [f"{'split':8}| " + " ".join(f"{name:>10}" for _, name in cols)]
    for split in ("novel", "base"):
        row = metrics.get(split) or {}
        cell = lambda v: f"{100 * v:10.1f}" if v is not None else f"{'-':>10}"  # noqa: E731
        lines.append(f"{split:8}| " + " ".join(cell(row.get(key)) for key, _ in cols))
    return "\n".join(lines)
