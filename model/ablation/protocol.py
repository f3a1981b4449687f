"""What an ablation compares, fixed before any number was seen: the arms (config overrides), the studies
(config, arms, results file), the metrics reported and the comparisons the decision rule judges, and the
protocol line that names all of it in the results file."""
import json
import os
from dataclasses import dataclass, field

from .digest import config_digest

MODEL_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(MODEL_DIR, "configs")
RESULTS_DIR = os.path.join(MODEL_DIR, "results")

# arm -> (config overrides, what it is). Table 2's rows, plus the arm that separates the CL head's
# architecture (its Y fused into the mask head) from the loss (lambda = 0), and both loss presets.
ARMS = {
    "baseline": (["model.use_cam=false", "model.use_cl=false"], "partially-supervised Mask R-CNN, class-agnostic"),
    "cam": (["model.use_cl=false"], "+ CAM added to the mask head's input"),
    "cam_clhead": (["contrast.lambda_start=0", "contrast.lambda_end=0"],
                   "+ CAM + CL head fused into the mask head, contrastive loss weight 0"),
    "cam_cl_paper": (["preset=paper"], "+ CAM + CL, the paper's loss (text: tau 0.7/0.3, lambda 0.25->1)"),
    "cam_cl_released": (["preset=released"], "+ CAM + CL, the authors' released code's loss and mask-loss ROIs"),
    "cam_cl_base": (["contrast.supervision=base"], "+ CAM + CL on base ROIs only (Table 6)"),
    "cam_gtrois": (["model.use_cl=false", "model.mask_loss_rois=gt"],
                   "+ CAM, mask loss on ground-truth-box ROIs only (the released arm's control)"),
}


@dataclass(frozen=True)
class Study:
    config: str
    arms: list
    results: str  # file stem under RESULTS_DIR
    arm_overrides: dict = field(default_factory=dict)  # arm -> overrides replacing ARMS[arm]'s in this study


STUDIES = {
    # From scratch (ResNet-18, GroupNorm, AdamW). Its released arm runs without enhance_op and the
    # projector's BatchNorm, which the `released` preset turns on: its committed results were run so.
    "v2": Study("ablation.json", ["baseline", "cam", "cam_clhead", "cam_cl_paper", "cam_cl_released"],
                "ablation-shapes-category-v2",
                {"cam_cl_released": ["preset=released", "model.cl_enhance=false", "model.cl_projector_norm=null"]}),
    # ImageNet-pretrained MobileNetV2 (frozen BN, first stages frozen), the authors' model in `released`
    "v3": Study("ablation_pretrained.json",
                ["baseline", "cam", "cam_clhead", "cam_cl_paper", "cam_cl_released", "cam_gtrois"],
                "ablation-shapes-category-v3"),
}
DEFAULT_STUDY = "v3"
DEFAULT_SEEDS = [0, 1, 2]
# (label, path into a run's metrics) of the numbers the table and plot show, in percent
METRICS = [
    ("novel mask AP", ("detected", "novel", "segm", "mAP")),
    ("base mask AP", ("detected", "base", "segm", "mAP")),
    ("novel box AP", ("detected", "novel", "bbox", "mAP")),
    ("base box AP", ("detected", "base", "bbox", "mAP")),
    ("novel mask AP, gt boxes", ("gt_boxes", "novel", "mask_ap")),
    ("base mask AP, gt boxes", ("gt_boxes", "base", "mask_ap")),
    ("novel mIoU, gt boxes", ("gt_boxes", "novel", "mean_iou")),
    ("novel CAM AUC", ("gt_boxes", "novel", "cam_auc")),
]
# the comparisons the decision rule is applied to: (better?, than)
# (a comparison whose arms a study lacks is left out of its report)
COMPARISONS = [("cam", "baseline"), ("cam_clhead", "cam"), ("cam_cl_paper", "cam_clhead"),
               ("cam_cl_released", "cam_clhead"), ("cam_cl_paper", "cam"), ("cam_cl_released", "cam"),
               ("cam_gtrois", "cam"), ("cam_cl_released", "cam_gtrois")]


def describe_protocol(config_path, sets, probe, arms, seeds):
    m, t = probe["model"], probe["train"]
    lr = t["base_lr"] * t["images_per_batch"] / t["base_batch"]
    return (f"config {os.path.relpath(config_path)} {' '.join(sets)}; arms {arms}; seeds {seeds}; "
            f"backbone {m['backbone']} ({m['backbone_weights'] or 'from scratch'}, {m['backbone_norm']}, "
            f"{m['trainable_layers']} stages train); optimizer {t['optimizer']} lr {lr:g}; "
            f"{probe['train']['length']} {probe['train']['unit']}s of batch {probe['train']['images_per_batch']}; "
            f"data {probe['data']['kind']} {json.dumps(probe['data']['shapes'], sort_keys=True)}; "
            f"validation images: {probe['eval']['max_images'] or 'all'}; config digest {config_digest(probe)}")
