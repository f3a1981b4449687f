"""ROI heads of ContrastMask (Fig. 2): CAM box head, CL head and class-agnostic mask head on top of
torchvision's RoIHeads (proposal sampling, box loss and post-processing are torchvision's).

Training, for the positive ROIs of the batch:
  X   = RoIAlign 14x14 (mask branch input)
  CAM = box head CAM of the ROI's ground-truth class
  Y,Z = CL head on RoIAlign 28x28 features
  mask logits = mask head(X + 1x1(Y) + CAM)
  L_mask  on base ROIs only (instances with a mask; has_mask),
  L_con   = query-sharing contrastive loss on Z, with the 28x28 mask targets of base ROIs and the
            CAMs (28x28) of box-only ROIs.
Test: the same on the detected boxes, with the CAM of the predicted class.

The key sampler's seed is data: the training loop sets `sampler_seed` every iteration (from the run's
seed, the iteration and the rank), so the loss never draws from torch's global generator and adding the
contrastive loss leaves every other random draw of the run (proposal and ROI sampling) unchanged.
With global queries the training loop sets `contrast_process_group` too, and the seed does not depend
on the rank (the ranks sample the keys of the global batch together).
"""
import torch
import torch.nn.functional as F
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss, project_masks_on_boxes

from .cams import resize_cams
from .contrast_loss import query_sharing_contrastive_loss

SUPERVISION = ("all", "base", "novel")
MASK_LOSS_ROIS = ("all", "gt")


def roi_mask_targets(targets, boxes, matched_idxs, size):
    """Binary (N, size, size) ground-truth masks cropped to the ROIs (RoIAlign, then >= 0.5)."""
    per_image = [project_masks_on_boxes(t["masks"], b, i, size) for t, b, i in zip(targets, boxes, matched_idxs)]
    return torch.cat(per_image) >= 0.5


def is_gt_box(targets, boxes, matched_idxs):
    """(N,) bool: the ROI is a ground-truth box itself (torchvision adds them to the proposals), not a
    proposal that overlaps one."""
    return torch.cat([(b == t["boxes"][i]).all(1) for t, b, i in zip(targets, boxes, matched_idxs)])


class ContrastMaskRoIHeads(RoIHeads):
    def __init__(self, box_roi_pool, box_head, mask_roi_pool, mask_head, cl_roi_pool=None, cl_head=None, *,
                 use_cam=True, cl_detach_input=True, contrast=None, mask_loss_rois="all", **box_kwargs):
        super().__init__(box_roi_pool, box_head, None, **box_kwargs)
        self.mask_roi_pool = mask_roi_pool
        self.mask_head = mask_head
        self.cl_roi_pool = cl_roi_pool
        self.cl_head = cl_head
        self.use_cam = use_cam
        self.cl_detach_input = cl_detach_input
        self.contrast = dict(contrast or {})
        self.supervision = self.contrast.pop("supervision", "all")
        if self.supervision not in SUPERVISION:
            raise ValueError(f"supervision must be one of {SUPERVISION}, got {self.supervision!r}")
        self.contrast_scale = float(self.contrast.pop("scale", 1.0))
        if mask_loss_rois not in MASK_LOSS_ROIS:
            raise ValueError(f"mask_loss_rois must be one of {MASK_LOSS_ROIS}, got {mask_loss_rois!r}")
        self.mask_loss_rois = mask_loss_rois
        self.sampler_seed = None  # set per iteration by the training loop; None: torch's generator
        # Set by the training loop: the loss pools queries and keys over this group's ROIs (None: this process's)
        self.contrast_process_group = None

    def has_mask(self):
        return True

    # ------------------------------------------------------------------ shared by train and test
    def mask_forward(self, features, boxes, image_shapes, cls_maps, labels, project):
        """Mask logits (N, 1, 2S, 2S), the CL projection Z (or None) and the raw CAMs (or None)."""
        x = self.mask_roi_pool(features, boxes, image_shapes)
        need_cams = self.use_cam or (project and self.cl_head is not None)
        cams = self.box_head.cams(cls_maps, labels) if need_cams else None
        y = z = None
        if self.cl_head is not None:
            cl_input = self.cl_roi_pool(features, boxes, image_shapes)
            if self.cl_detach_input:
                cl_input = cl_input.detach()
            y, z = self.cl_head(cl_input, project=project)
        mask_cams = resize_cams(cams, x.shape[-1]) if self.use_cam else None
        return self.mask_head(x, y, mask_cams), z, cams

    # ------------------------------------------------------------------ training
    def check_targets(self, targets):
        if targets is None:
            raise ValueError("targets should not be None")
        for key in ("boxes", "labels", "masks", "has_mask"):
            if not all(key in t for t in targets):
                raise ValueError(f"every target needs {key!r} (box-only instances: has_mask False, zero mask)")

    def mask_losses(self, mask_logits, z, cams, boxes, matched_idxs, targets):
        mask_targets = roi_mask_targets(targets, boxes, matched_idxs, mask_logits.shape[-1])
        has_mask = torch.cat([t["has_mask"][i] for t, i in zip(targets, matched_idxs)])
        logits = mask_logits[:, 0]
        # "gt": only the ground-truth boxes that torchvision adds to the proposals (the released code)
        in_mask_loss = has_mask & is_gt_box(targets, boxes, matched_idxs) if self.mask_loss_rois == "gt" else has_mask
        if in_mask_loss.any():
            loss_mask = F.binary_cross_entropy_with_logits(logits[in_mask_loss],
                                                           mask_targets[in_mask_loss].to(logits.dtype))
        else:
            loss_mask = logits.sum() * 0
        losses = {"loss_mask": loss_mask}
        if z is not None:
            if z.shape[-1] != mask_targets.shape[-1]:
                mask_targets = roi_mask_targets(targets, boxes, matched_idxs, z.shape[-1])
            losses["loss_contrast"] = self.contrastive_loss(z, mask_targets, has_mask, cams)
        return losses

    def contrastive_loss(self, z, mask_targets, has_mask, cams):
        size = z.shape[-1]
        # rows of box-only ROIs are zeroed: whatever a dataset holds there never reaches the loss
        masks = mask_targets & has_mask[:, None, None]
        is_novel = ~has_mask
        valid = {"all": None, "base": has_mask, "novel": is_novel}[self.supervision]
        cam_maps = resize_cams(cams.detach().float(), size)
        loss = query_sharing_contrastive_loss(z, masks, cam_maps, is_novel, valid=valid, seed=self.sampler_seed,
                                              process_group=self.contrast_process_group, **self.contrast)
        return loss * self.contrast_scale if self.contrast_scale != 1.0 else loss

    # ------------------------------------------------------------------ forward
    def forward(self, features, proposals, image_shapes, targets=None):
        if self.training:
            self.check_targets(targets)
            proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        box_features = self.box_roi_pool(features, proposals, image_shapes)
        class_logits, box_regression, cls_maps = self.box_head(box_features)

        if self.training:
            loss_classifier, loss_box_reg = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)
            losses = {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}
            # the mask branch sees the positive ROIs, with their ground-truth classes
            pos = [torch.where(lab > 0)[0] for lab in labels]
            offsets = [0]
            for p in proposals[:-1]:
                offsets.append(offsets[-1] + p.shape[0])
            pos_flat = torch.cat([p + o for p, o in zip(pos, offsets)])
            pos_boxes = [p[i] for p, i in zip(proposals, pos)]
            pos_matched = [m[i] for m, i in zip(matched_idxs, pos)]
            pos_labels = torch.cat([lab[i] for lab, i in zip(labels, pos)])
            mask_logits, z, cams = self.mask_forward(features, pos_boxes, image_shapes, cls_maps[pos_flat],
                                                     pos_labels, project=True)
            losses.update(self.mask_losses(mask_logits, z, cams, pos_boxes, pos_matched, targets))
            return [], losses

        boxes, scores, labels = self.postprocess_detections(class_logits, box_regression, proposals, image_shapes)
        det_labels = torch.cat(labels)
        det_maps = None
        if self.use_cam:  # the CAM of each detection's predicted class, on the detected box
            det_maps = self.box_head(self.box_roi_pool(features, boxes, image_shapes))[2]
        mask_logits, _, _ = self.mask_forward(features, boxes, image_shapes, det_maps, det_labels, project=False)
        mask_probs = mask_logits.sigmoid().split([b.shape[0] for b in boxes])
        result = [{"boxes": b, "labels": lab, "scores": s, "masks": m}
                  for b, lab, s, m in zip(boxes, labels, scores, mask_probs)]
        return result, {}
