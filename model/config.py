"""Experiment configs: JSON files under model/configs/, merged over DEFAULTS, plus --set overrides.

Every key a config may set is listed in DEFAULTS (a typo is an error, not a silent no-op). The
defaults are the paper's ContrastMask R-50-FPN settings; configs state only what they change
(tests/model/test_config.py holds the shipped ones to it, and lists the few fixed files that restate a key).
A key added later defaults to null only where null means the behaviour from before the key existed
(model/ablation/digest.py's config digest leaves nulls out, so results recorded before stay valid).

SCHEMA gives every key its type and allowed values; load_config checks the resolved config against it
(file values and overrides alike) and raises ConfigError, one line naming the key and showing the value.
"""
import argparse
import copy
import json
import math
import sys

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


class ConfigError(ValueError):
    """A config (a file or a --set override) that cannot be used: unknown key, wrong type, value not allowed,
    unreadable file. The message is one line naming the key and showing the value; the scripts print it and
    exit with status 2 (config_from_args, load_or_exit)."""


# ------------------------------------------------------------------------------------------------ schema
# Values are checked as they are, never converted, so validating a config cannot change its digest
# (model/ablation/digest.py).

class Kind:
    """One type of value: `text` says what is accepted (in error messages), `test(value)` whether value is."""

    def __init__(self, text, test, takes_bool=False, takes_null=False):
        self.text, self.test = text, test
        self.takes_bool, self.takes_null = takes_bool, takes_null  # Python's True/False/None in --set (parse_override)


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):  # ints count as numbers; bools do not; NaN and infinities are not numbers here
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def integer(minimum=None, maximum=None):
    if maximum is not None:
        text = f"an integer in [{minimum}, {maximum}]"
    else:
        text = "an integer" if minimum is None else f"an integer >= {minimum}"
    return Kind(text, lambda v: _is_int(v) and (minimum is None or v >= minimum) and (maximum is None or v <= maximum))


def number(minimum=None, maximum=None, above=None):
    """A finite int or float; minimum and maximum inclusive, above exclusive."""
    bounds = [f"> {above}"] * (above is not None) + [f">= {minimum}"] * (minimum is not None) + \
        [f"<= {maximum}"] * (maximum is not None)
    return Kind(" ".join(["a number", " and ".join(bounds)]).strip(),
                lambda v: _is_number(v) and (above is None or v > above) and (minimum is None or v >= minimum)
                and (maximum is None or v <= maximum))


def one_of(*choices):
    return Kind(" | ".join(json.dumps(c) for c in choices), lambda v: isinstance(v, str) and v in choices)


def either(first, second):
    return Kind(f"{first.text} | {second.text}", lambda v: first.test(v) or second.test(v),
                first.takes_bool or second.takes_bool, first.takes_null or second.takes_null)


def list_of(kind, items_text, nonempty=True):
    return Kind(f"a {'non-empty ' if nonempty else ''}list of {items_text}",
                lambda v: isinstance(v, list) and (len(v) > 0 or not nonempty) and all(kind.test(x) for x in v))


BOOL = Kind("true | false", lambda v: isinstance(v, bool), takes_bool=True)
NULL = Kind("null", lambda v: v is None, takes_null=True)
STRING = Kind("a string", lambda v: isinstance(v, str))
MAPPING = Kind("a mapping", lambda v: isinstance(v, dict))
COUNT = integer(minimum=0)
POSITIVE = integer(minimum=1)
FRACTION = number(minimum=0, maximum=1)

SCHEMA = {
    "seed": integer(),
    "output_dir": STRING,
    "data": {
        "kind": one_of("coco", "shapes"),
        "root": STRING,
        "shapes": MAPPING,  # free-form: checked by the generator (model/data/shapes.py)
        "train_images": STRING,
        "train_annotations": STRING,
        "val_images": STRING,
        "val_annotations": STRING,
        "base": either(one_of("voc", "nonvoc", "shapes", "all", "none"),
                       list_of(STRING, "category names", nonempty=False)),
        "num_workers": COUNT,
    },
    "model": {
        "backbone": STRING,  # checked against torchvision's models when the backbone is built
        "backbone_weights": either(NULL, STRING),  # "imagenet" or a path
        "backbone_norm": one_of("frozen_bn", "gn", "bn"),
        "trainable_layers": integer(0, 5),
        "fpn_channels": POSITIVE,
        "head_norm": either(NULL, one_of("gn")),
        "min_size": list_of(POSITIVE, "integers >= 1"),
        "max_size": POSITIVE,
        "anchor_sizes": list_of(POSITIVE, "integers >= 1"),
        "aspect_ratios": list_of(number(above=0), "numbers > 0"),
        "rpn_pre_nms_top_n_train": POSITIVE,
        "rpn_post_nms_top_n_train": POSITIVE,
        "rpn_pre_nms_top_n_test": POSITIVE,
        "rpn_post_nms_top_n_test": POSITIVE,
        "rpn_batch_size_per_image": POSITIVE,
        "box_batch_size_per_image": POSITIVE,
        "box_positive_fraction": FRACTION,
        "box_roi_size": POSITIVE,
        "roi_align_aligned": BOOL,
        "box_channels": POSITIVE,
        "box_shared_convs": COUNT,
        "box_cls_convs": COUNT,
        "box_cls_kernel": POSITIVE,
        "box_reg_convs": COUNT,
        "box_reg_head": one_of("gap", "fc"),
        "box_fc_channels": POSITIVE,
        "box_score_thresh": FRACTION,
        "box_nms_thresh": FRACTION,
        "detections_per_img": POSITIVE,
        "mask_roi_size": POSITIVE,
        "mask_channels": POSITIVE,
        "mask_convs": COUNT,
        "use_cam": BOOL,
        "use_cl": BOOL,
        "cl_roi_size": POSITIVE,
        "cl_convs": POSITIVE,
        "cl_fcs": POSITIVE,
        "cl_channels": POSITIVE,
        "cl_detach_input": BOOL,
        "cl_projector_norm": either(NULL, one_of("bn")),
        "cl_enhance": BOOL,
        "mask_loss_rois": one_of("all", "gt"),
    },
    "contrast": {
        "supervision": one_of("all", "base", "novel"),
        "share_queries": BOOL,
        "sigma": number(above=0, maximum=1),
        "tau_easy": number(above=0),  # the loss asks for >= 1e-4 and says so when it is built
        "tau_hard": number(above=0),
        "delta": number(minimum=0, maximum=0.5),
        "hard_sqdist": integer(),
        "min_keys": COUNT,
        "formulation": one_of("paper", "released"),
        "scale": number(),
        "lambda_start": number(),
        "lambda_end": number(),
        "lambda_warmup": number(minimum=0),
        "lambda_schedule": one_of("linear", "epoch_step"),
        "global_queries": either(NULL, BOOL),
    },
    "train": {
        "unit": one_of("epoch", "iter"),
        "length": number(minimum=0),  # in units: a fraction of an epoch is fine
        "lr_steps": list_of(number(minimum=0), "numbers >= 0", nonempty=False),
        "images_per_batch": POSITIVE,
        "base_lr": number(minimum=0),
        "base_batch": POSITIVE,
        "optimizer": one_of("sgd", "adamw"),
        "momentum": number(minimum=0),
        "weight_decay": number(minimum=0),
        "warmup_iters": COUNT,
        "warmup_factor": number(minimum=0),
        "clip_grad_norm": either(NULL, number(above=0)),
        "flip_prob": FRACTION,
        "amp": BOOL,
        "checkpoint_every": POSITIVE,
        "log_every": POSITIVE,
        "find_unused_parameters": BOOL,
    },
    "eval": {
        "images_per_batch": POSITIVE,
        "max_images": either(NULL, POSITIVE),
    },
    "preset": one_of(*PRESETS),
}


def schema_of(keys):
    """The Kind (or section dict) of the key path keys, or None for a key the schema does not know."""
    node = SCHEMA
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def show(value):
    """A value as JSON (how configs are written), shortened to one line."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def validate(cfg, schema=None, path=""):
    """Raises ConfigError for the first value of cfg that its key's Kind refuses."""
    schema = SCHEMA if schema is None else schema
    for key, kind in schema.items():
        value = cfg[key]
        if isinstance(kind, dict):
            validate(value, kind, path + key + ".")
        elif not kind.test(value):
            hint = (f" ({value} means {json.dumps(PYTHON_LITERALS[value][1])} only for a key that takes it)"
                    if isinstance(value, str) and value in PYTHON_LITERALS else "")
            raise ConfigError(f"config key {path + key} must be {kind.text}, got {show(value)}{hint}")
    return cfg


def _merge(base, update, path=""):
    if not isinstance(update, dict):
        raise ConfigError(f"a config must be a mapping of keys to values, got {show(update)}")
    for key, value in update.items():
        if key not in base:
            raise ConfigError(f"unknown config key {path + key}")
        if key == "shapes":  # generator parameters: free-form, checked by the generator
            if not isinstance(value, dict):
                raise ConfigError(f"config key {path + key} must be a mapping, got {show(value)}")
            base[key] = dict(base[key], **value)
        elif isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {path + key} is a section and must be a mapping, got {show(value)}")
            _merge(base[key], value, path + key + ".")
        else:
            base[key] = copy.deepcopy(value)
    return base


# Python's spellings, accepted in --set where the key takes that kind of value; elsewhere they stay strings,
# which the schema then refuses for a key that is not a string (model.use_cl=False must never be true).
PYTHON_LITERALS = {"True": ("takes_bool", True), "False": ("takes_bool", False), "None": ("takes_null", None)}


def parse_override(text):
    """'train.length=8' -> (['train', 'length'], 8). Values are JSON (true, null, 8, [1, 2], "x"), else plain
    strings; True / False / None mean true / false / null where the key takes a bool / null."""
    key, sep, raw = text.partition("=")
    if not sep:
        raise ConfigError(f"override {text!r} is not key=value")
    keys = key.split(".")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    kind = schema_of(keys)
    if raw in PYTHON_LITERALS and isinstance(kind, Kind):
        takes, literal = PYTHON_LITERALS[raw]
        if getattr(kind, takes):
            value = literal
    return keys, value


def nested(keys, value):
    out = value
    for key in reversed(keys):
        out = {key: out}
    return out


def load_config(path=None, overrides=()):
    """DEFAULTS <- the preset <- the JSON file at path <- each 'a.b=value' override, in order, checked
    against SCHEMA. The preset is the last "preset" named by the overrides or the file (default "paper").
    Raises ConfigError."""
    file_cfg = {}
    if path:
        try:
            with open(path) as f:
                file_cfg = json.load(f)
        except OSError as e:
            raise ConfigError(f"config file {path}: {e.strerror or e}") from None
        except ValueError as e:
            raise ConfigError(f"config file {path} is not valid JSON: {e}") from None
        if not isinstance(file_cfg, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys to values, got {show(file_cfg)}")
    updates = []
    for item in overrides:
        if isinstance(item, str):
            keys, value = parse_override(item)
            item = nested(keys, value)
        updates.append(item)
    preset = file_cfg.get("preset", DEFAULTS["preset"])
    for item in updates:
        preset = item.get("preset", preset)
    if not (isinstance(preset, str) and preset in PRESETS):
        raise ConfigError(f"config key preset must be {SCHEMA['preset'].text}, got {show(preset)}")
    cfg = copy.deepcopy(DEFAULTS)
    _merge(cfg, PRESETS[preset])
    for item in [file_cfg, *updates]:
        _merge(cfg, item)
    return validate(cfg)


def exit_on_config_error(error):
    """What the scripts do with a ConfigError: its one line on stderr, exit status 2 (as argparse does)."""
    print(f"error: {error}", file=sys.stderr)
    raise SystemExit(2)


def load_or_exit(path=None, overrides=()):
    """load_config for a script: a ConfigError ends the program with its message, no traceback."""
    try:
        return load_config(path, overrides)
    except ConfigError as e:
        exit_on_config_error(e)


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
    """The config the shared arguments describe; applies --threads. A bad config ends the program (status 2)."""
    cfg = load_or_exit(args.config, args.set)
    if args.output_dir:
        cfg["output_dir"] = args.output_dir
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return cfg
