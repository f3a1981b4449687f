"""Builds ContrastMask (or the partially-supervised Mask R-CNN baseline: use_cam and use_cl off)
from the "model" section of a config (model/config.py), out of torchvision's detection parts."""
import functools

from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from .backbone import build_backbone
from .box_head import CamBoxHead
from .cl_head import CLHead
from .mask_head import ClassAgnosticMaskHead
from .poolers import RoIAlignPooler
from .roi_heads import ContrastMaskRoIHeads

FPN_LEVELS = ["0", "1", "2", "3"]


class ContrastMaskRCNN(GeneralizedRCNN):
    """GeneralizedRCNN(backbone, rpn, ContrastMaskRoIHeads, transform). Outputs are torchvision's:
    a loss dict in training (loss_objectness, loss_rpn_box_reg, loss_classifier, loss_box_reg,
    loss_mask, and loss_contrast when the CL head is on), detections with masks at test."""


def build_model(m, contrast, num_classes):
    """m: config["model"]; contrast: config["contrast"]; num_classes includes the background."""
    backbone = build_backbone(m["backbone"], m["backbone_weights"], m["backbone_norm"], m["trainable_layers"],
                              m["fpn_channels"])
    channels = backbone.out_channels
    anchors = AnchorGenerator(tuple((s,) for s in m["anchor_sizes"]),
                              (tuple(m["aspect_ratios"]),) * len(m["anchor_sizes"]))
    rpn = RegionProposalNetwork(
        anchors, RPNHead(channels, anchors.num_anchors_per_location()[0]),
        fg_iou_thresh=0.7, bg_iou_thresh=0.3, batch_size_per_image=m["rpn_batch_size_per_image"],
        positive_fraction=0.5,
        pre_nms_top_n={"training": m["rpn_pre_nms_top_n_train"], "testing": m["rpn_pre_nms_top_n_test"]},
        post_nms_top_n={"training": m["rpn_post_nms_top_n_train"], "testing": m["rpn_post_nms_top_n_test"]},
        nms_thresh=0.7)

    pool = functools.partial(RoIAlignPooler, featmap_names=FPN_LEVELS, sampling_ratio=2,
                             aligned=m["roi_align_aligned"])
    box_head = CamBoxHead(channels, m["box_channels"], num_classes,
                          m["box_shared_convs"], m["box_cls_convs"], m["box_reg_convs"], m["head_norm"],
                          m["box_reg_head"], m["box_roi_size"], m["box_fc_channels"], m["box_cls_kernel"])
    cl_head = CLHead(channels, m["cl_channels"], m["cl_convs"], m["cl_fcs"], m["head_norm"], m["cl_projector_norm"],
                     m["cl_enhance"]) if m["use_cl"] else None
    mask_head = ClassAgnosticMaskHead(channels, m["mask_channels"], m["mask_convs"],
                                      cl_head.out_channels if cl_head else None, m["head_norm"])
    loss_params = {k: contrast[k] for k in ("supervision", "share_queries", "sigma", "tau_easy", "tau_hard",
                                            "delta", "hard_sqdist", "min_keys", "formulation", "scale")}
    roi_heads = ContrastMaskRoIHeads(
        pool(output_size=m["box_roi_size"]), box_head,
        pool(output_size=m["mask_roi_size"]), mask_head,
        pool(output_size=m["cl_roi_size"]) if cl_head else None, cl_head,
        use_cam=m["use_cam"], cl_detach_input=m["cl_detach_input"], contrast=loss_params,
        mask_loss_rois=m["mask_loss_rois"],
        fg_iou_thresh=0.5, bg_iou_thresh=0.5, batch_size_per_image=m["box_batch_size_per_image"],
        positive_fraction=m["box_positive_fraction"], bbox_reg_weights=None,
        score_thresh=m["box_score_thresh"], nms_thresh=m["box_nms_thresh"],
        detections_per_img=m["detections_per_img"])
    transform = GeneralizedRCNNTransform(m["min_size"], m["max_size"], [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    return ContrastMaskRCNN(backbone, rpn, roi_heads, transform)
