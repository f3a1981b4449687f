"""Experiment configs: JSON files under model/configs/, merged over DEFAULTS, plus --set overrides.

Every key a config may set is listed in DEFAULTS (a typo is an error, not a silent no-op). The
defaults are the paper's ContrastMask R-50-FPN settings; configs state only what they change.
A key added later defaults to null only where null means the behaviour from before the key existed
(model/ablate.py's config digest leaves nulls out, so results recorded before stay valid).
"""
import argparse
import copy
import json

DEFAULTS = {
    "seed": 0,
    "output_dir": "runs/default",
    "data": {
        "kind": "coco",                  # "coco" (files on disk) or "shapes" (generated into root)
        "root": ".cache/shapes",         # shapes: where the generated dataset is cached
        "shapes": {},                    # shapes generator parameters (model/data/shapes.py DEFAULTS)
        "train_images": "datasets/coco/train2017",
        "train_annotations": "datasets/coco/annotations/instances_train2017.json",
        "val_images": "datasets/coco/val2017",
        "val_annotations": "datasets/coco/annotations/instances_val2017.json",
        "base": "nonvoc",                # voc | nonvoc | shapes | all | none | [names]
        "num_workers": 4,
    },
    "model": {
        "backbone": "resnet50",          # any torchvision ResNet (resnet18/34/50/101/152, resnext...) | mobilenet_v2
        "backbone_weights": None,        # None (from scratch) | "imagenet" | path (model/contrastmask/backbone.py)
        "backbone_norm": "frozen_bn",    # frozen_bn (pretrained) | gn (ResNets) | bn (from scratch)
        "trainable_layers": 3,           # 0..5 backbone stages that train, counted from the last (5 = all)
        "fpn_channels": 256,
        "head_norm": None,               # None (the paper) | "gn": GroupNorm in the box, mask and CL convs
        "min_size": [640, 672, 704, 736, 768, 800],  # training short side drawn per batch; test: last
        "max_size": 1333,
        "anchor_sizes": [32, 64, 128, 256, 512],
        "aspect_ratios": [0.5, 1.0, 2.0],
        "rpn_pre_nms_top_n_train": 2000,
        "rpn_post_nms_top_n_train": 2000,
        "rpn_pre_nms_top_n_test": 1000,
        "rpn_post_nms_top_n_test": 1000,
        "rpn_batch_size_per_image": 256,
        "box_batch_size_per_image": 512,
        "box_positive_fraction": 0.25,
        "box_roi_size": 7,
        "roi_align_aligned": False,      # RoIAlign's half-pixel offset (True: mmdetection, the authors' code)
        "box_channels": 256,
        "box_shared_convs": 4,           # the released code's box head: 4 shared, 1 cls, 2 reg convs
        "box_cls_convs": 1,
        "box_cls_kernel": 3,             # kernel size of the cls convs (1: a sharper CAM, each position local)
        "box_reg_convs": 2,
        "box_reg_head": "gap",           # gap (released code) | fc: flatten -> fc -> bbox_pred
        "box_fc_channels": 1024,         # width of that fc
        "box_score_thresh": 0.05,
        "box_nms_thresh": 0.5,
        "detections_per_img": 100,
        "mask_roi_size": 14,
        "mask_channels": 256,
        "mask_convs": 4,
        "use_cam": True,                 # CAM added to the mask head's input (Table 2 "CM")
        "use_cl": True,                  # CL head + contrastive loss (Table 2 "CL")
        "cl_roi_size": 28,
        "cl_convs": 8,                   # CnFm (Table 3): n encoder Conv-ReLU layers
        "cl_fcs": 3,                     #                 m projector layers
        "cl_channels": 256,
        "cl_detach_input": True,         # the released code feeds the CL head detached ROI features
        "cl_projector_norm": None,       # None | "bn": BatchNorm in the projector's hidden layers (released code)
        "cl_enhance": False,             # non-local enhancement of the Y fused into the mask head (released code)
        "mask_loss_rois": "all",         # all: every positive base ROI | gt: ground-truth boxes only (released)
    },
    "contrast": {
        "supervision": "all",            # all | base | novel (Table 6), through the op's `valid`
        "share_queries": True,           # Table 7
        "sigma": 0.3,                    # Table 4
        "tau_easy": 0.7,                 # Table 5 (tau_hard = 1 - tau in the paper)
        "tau_hard": 0.3,
        "delta": 0.1,
        "hard_sqdist": 2,
        "min_keys": 5,
        "formulation": "paper",          # paper | released
        "scale": 1.0,                    # L_con is multiplied by this (the released code: 0.1)
        "lambda_start": 0.25,            # lambda warmed up linearly ...
        "lambda_end": 1.0,
        "lambda_warmup": 4,              # ... over this many epochs (or iterations, see train.unit)
        "lambda_schedule": "linear",     # linear: every iteration | epoch_step: once per epoch (released)
        # Queries and key pools over the ROIs of all processes (the loss of the global batch, as one process
        # would compute it; docs/DESIGN.md, "Global query sharing"), or of each process's own ROIs (the
        # authors' code). null: global when there are several processes; true / false force it.
        "global_queries": None,
    },
    "train": {
        "unit": "epoch",                 # unit of epochs/lr_steps/lambda_warmup: "epoch" or "iter"
        "length": 12,                    # schedule length in `unit`s
        "lr_steps": [8, 11],             # lr x 0.1 at each
        "images_per_batch": 16,          # global batch (all ranks)
        "base_lr": 0.02,                 # for base_batch images; scaled linearly to images_per_batch
        "base_batch": 16,
        "optimizer": "sgd",              # sgd (the paper) | adamw (the CPU demo: learns from scratch faster)
        "momentum": 0.9,
        "weight_decay": 0.0001,
        "warmup_iters": 500,             # linear lr warm-up (iterations)
        "warmup_factor": 0.001,
        "clip_grad_norm": None,          # max global gradient norm (None: no clipping, as the paper)
        "flip_prob": 0.5,
        "amp": True,                     # mixed precision, on GPU only
        "checkpoint_every": 1000,        # iterations
        "log_every": 20,
        "find_unused_parameters": False,
    },
    "eval": {
        "images_per_batch": 8,
        "max_images": None,              # evaluate on the first N validation images only
    },
}


# Loss presets (`"preset"` in a config file, or --set preset=NAME): merged over DEFAULTS before the file.
# "paper" follows the paper's text (Sec. 3.5, 4.1). "released" follows the authors' released code, which
# is what produced the paper's numbers: their loss formula, temperatures swapped, the loss x 0.1, lambda
# stepped once per epoch, the mask loss on the ground-truth boxes of base categories only, BatchNorm in the
# CL projector and enhance_op on the Y fused into the mask head. docs/DESIGN.md, "The released preset",
# cites the authors' file and function for each item.
PRESETS = {
    "paper": {},
    "released": {
        "model": {"mask_loss_rois": "gt", "cl_projector_norm": "bn", "cl_enhance": True},
        "contrast": {"formulation": "released", "tau_easy": 0.3, "tau_hard": 0.7, "scale": 0.1,
                     "lambda_schedule": "epoch_step"},
    },
}
DEFAULTS["preset"] = "paper"


def _merge(base, update, path=""):
    for key, value in update.items():
        if key not in base:
            raise KeyError(f"unknown config key {path + key!r}")
        if key == "shapes":  # generator parameters: free-form, checked by the generator
            base[key] = dict(base[key], **value)
        elif isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise TypeError(f"config key {path + key!r} must be a mapping")
            _merge(base[key], value, path + key + ".")
        else:
            base[key] = copy.deepcopy(value)
    return base


def parse_override(text):
    """'train.length=8' -> (['train', 'length'], 8); values are JSON, else plain strings."""
    key, sep, raw = text.partition("=")
    if not sep:
        raise ValueError(f"override {text!r} is not key=value")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return key.split("."), value


def nested(keys, value):
    out = value
    for key in reversed(keys):
        out = {key: out}
    return out


def load_config(path=None, overrides=()):
    """DEFAULTS <- the preset <- the JSON file at path <- each 'a.b=value' override, in order. The preset
    is the last "preset" named by the overrides or the file (default "paper")."""
    file_cfg = {}
    if path:
        with open(path) as f:
            file_cfg = json.load(f)
    updates = []
    for item in overrides:
        if isinstance(item, str):
            keys, value = parse_override(item)
            item = nested(keys, value)
        updates.append(item)
    preset = file_cfg.get("preset", DEFAULTS["preset"])
    for item in updates:
        preset = item.get("preset", preset)
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    cfg = copy.deepcopy(DEFAULTS)
    _merge(cfg, PRESETS[preset])
    for item in [file_cfg, *updates]:
        _merge(cfg, item)
    return cfg


def script_parser(doc, default_config=None):
    """The arguments every script shares: --config, --set, --output-dir, --device, --threads."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=default_config is None, default=default_config)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, e.g. train.length=8")
    p.add_argument("--output-dir", help="overrides the config's output_dir")
    p.add_argument("--device", help="cpu or cuda[:i] (default: the GPU when there is one)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    return p


def config_from_args(args):
    """The config the shared arguments describe; applies --threads."""
    cfg = load_config(args.config, args.set)
    if args.output_dir:
        cfg["output_dir"] = args.output_dir
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return cfg
