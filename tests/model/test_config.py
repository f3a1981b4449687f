"""Configs, schedules and the ablation switches of the reference model."""
import json
import os
import subprocess
import sys

import pytest
import torch

from model.config import DEFAULTS, PRESETS, SCHEMA, ConfigError, Kind, load_config, validate
from model.contrastmask import build_model
from model.engine.schedule import contrast_weight
from model.engine.schedule import Schedule, lr_factor
from tiny_model import REPO

CONFIGS = os.path.join(REPO, "model", "configs")


def test_every_shipped_config_loads():
    names = sorted(os.listdir(CONFIGS))
    assert {"demo.json", "tiny.json", "r50_fpn_1x_nonvoc2voc.json", "r50_fpn_1x_voc2nonvoc.json"} <= set(names)
    for name in names:
        cfg = load_config(os.path.join(CONFIGS, name))
        assert validate(cfg) is cfg


# Shipped configs that restate values of DEFAULTS (+ their preset), and which: these files are fixed
# (the ablation's studies and the demo run on them as committed; their bytes are what the results cite).
RESTATING = {
    "ablation.json": {"data.root"},
    "ablation_pretrained.json": {"data.root", "model.trainable_layers"},
    "demo.json": {"data.root", "model.trainable_layers"},
}


def _restated(file_cfg, resolved_base, path=""):
    """Keys of file_cfg whose value is the one resolved_base already has (shapes: per generator key)."""
    out = set()
    for key, value in file_cfg.items():
        if isinstance(value, dict):
            base = resolved_base[key]
            if key == "shapes":
                out |= {f"{path}{key}.{k}" for k, v in value.items() if k in base and base[k] == v}
            else:
                out |= _restated(value, base, path + key + ".")
        elif resolved_base[key] == value:
            out.add(path + key)
    return out


def test_configs_state_only_what_they_change():
    # model/config.py: configs state only what they change (DEFAULTS are the paper's settings)
    names = sorted(name for name in os.listdir(CONFIGS) if name.endswith(".json"))
    assert set(RESTATING) <= set(names)
    for name in names:
        with open(os.path.join(CONFIGS, name)) as f:
            file_cfg = json.load(f)
        preset = file_cfg.pop("preset", None)
        assert preset != DEFAULTS["preset"], f"{name} restates the default preset {preset!r}"
        base = load_config(None, [] if preset is None else [f"preset={preset}"])
        assert _restated(file_cfg, base) == RESTATING.get(name, set()), name


def test_paper_configs_keep_the_paper_settings():
    for name, base in (("r50_fpn_1x_nonvoc2voc.json", "nonvoc"), ("r50_fpn_1x_voc2nonvoc.json", "voc")):
        cfg = load_config(os.path.join(CONFIGS, name))
        assert cfg["data"]["base"] == base
        m, t, c = cfg["model"], cfg["train"], cfg["contrast"]
        assert m["backbone"] == "resnet50" and m["fpn_channels"] == 256 and (m["cl_convs"], m["cl_fcs"]) == (8, 3)
        assert m["min_size"] == [640, 672, 704, 736, 768, 800] and t["flip_prob"] == 0.5
        assert (t["optimizer"], t["base_lr"], t["base_batch"]) == ("sgd", 0.02, 16)
        assert (t["unit"], t["length"], t["lr_steps"]) == ("epoch", 12, [8, 11])
        assert (c["sigma"], c["tau_easy"], c["tau_hard"], c["lambda_start"], c["lambda_end"]) == (0.3, 0.7, 0.3, 0.25, 1.0)


def test_overrides_and_unknown_keys(tmp_path):
    cfg = load_config(os.path.join(CONFIGS, "tiny.json"), ["train.length=7", "model.use_cl=false",
                                                          "data.base=[\"circle\"]", "output_dir=x/y"])
    assert cfg["train"]["length"] == 7 and cfg["model"]["use_cl"] is False
    assert cfg["data"]["base"] == ["circle"] and cfg["output_dir"] == "x/y"
    assert cfg["data"]["shapes"]["image_size"] == 64  # untouched keys of the file survive
    with pytest.raises(ConfigError, match="model.use_clx"):
        load_config(None, ["model.use_clx=1"])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train": {"lenght": 3}}))
    with pytest.raises(ConfigError, match="train.lenght"):
        load_config(str(bad))


def _keys(tree, path=""):
    out = set()
    for key, value in tree.items():
        out |= _keys(value, path + key + ".") if isinstance(value, dict) and key != "shapes" else {path + key}
    return out


def test_schema_types_every_key_and_presets_pass():
    assert _keys(SCHEMA) == _keys(DEFAULTS)
    assert all(isinstance(kind, Kind) for kind in _flat_kinds(SCHEMA))
    for preset in PRESETS:
        load_config(None, [f"preset={preset}"])


def _flat_kinds(tree):
    for value in tree.values():
        yield from _flat_kinds(value) if isinstance(value, dict) else [value]


def test_set_values_parse_as_the_key_takes_them():
    tiny = os.path.join(CONFIGS, "tiny.json")
    cfg = load_config(tiny, ["model.use_cl=False", "model.use_cam=True", "model.backbone_weights=None",
                             "contrast.global_queries=None", "train.clip_grad_norm=None", "output_dir=None"])
    assert cfg["model"]["use_cl"] is False and cfg["model"]["use_cam"] is True
    assert cfg["model"]["backbone_weights"] is None and cfg["contrast"]["global_queries"] is None
    assert cfg["train"]["clip_grad_norm"] is None
    assert cfg["output_dir"] == "None"  # a string key keeps the string
    assert load_config(tiny, ["contrast.global_queries=False"])["contrast"]["global_queries"] is False
    with pytest.raises(ConfigError, match=r'^config key model.use_cam must be true \| false, got "None" \(None means '):
        load_config(tiny, ["model.use_cam=None"])
    with pytest.raises(ConfigError, match='model.fpn_channels must be an integer >= 1, got "True"'):
        load_config(tiny, ["model.fpn_channels=True"])


@pytest.mark.parametrize("override, shown", [
    ("model.use_cl=maybe", '"maybe"'),
    ("model.use_cl=1", "1"),
    ("model.use_cam=None", '"None"'),
    ("train.length=abc", '"abc"'),
    ("train.images_per_batch=two", '"two"'),
    ("train.images_per_batch=0", "0"),
    ("train.images_per_batch=2.0", "2.0"),
    ("train.optimizer=adam", '"adam"'),
    ("train.unit=epochs", '"epochs"'),
    ("train.lr_steps=8", "8"),
    ("train.clip_grad_norm=true", "true"),
    ("contrast.formulation=Paper", '"Paper"'),
    ("contrast.supervision=none", '"none"'),
    ("contrast.lambda_schedule=cosine", '"cosine"'),
    ("contrast.sigma=true", "true"),
    ("contrast.global_queries=maybe", '"maybe"'),
    ("model.backbone_norm=ln", '"ln"'),
    ("model.head_norm=bn", '"bn"'),
    ("model.cl_projector_norm=gn", '"gn"'),
    ("model.mask_loss_rois=base", '"base"'),
    ("model.box_reg_head=mlp", '"mlp"'),
    ("model.backbone_weights=false", "false"),
    ("model.min_size=640", "640"),
    ("model.anchor_sizes=[]", "[]"),
    ("model.aspect_ratios=[1, \"2\"]", '[1, "2"]'),
    ("model.trainable_layers=6", "6"),
    ("data.kind=voc", '"voc"'),
    ("data.base=7", "7"),
    ("data.base=[1]", "[1]"),
    ("data.shapes=3", "3"),
    ("eval.max_images=2.5", "2.5"),
    ("seed=1.5", "1.5"),
    ("preset=mine", '"mine"'),
])
def test_bad_values_are_refused_naming_the_key(override, shown):
    with pytest.raises(ConfigError) as info:
        load_config(os.path.join(CONFIGS, "tiny.json"), [override])
    message = str(info.value)
    key = override.split("=")[0]
    assert f"config key {key} must be " in message and f"got {shown}" in message, message
    assert "\n" not in message


def test_file_values_are_checked_like_overrides(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model": {"use_cl": "False"}}))
    with pytest.raises(ConfigError, match='model.use_cl must be true \\| false, got "False"'):
        load_config(str(bad))
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="missing.json"):
        load_config(str(tmp_path / "missing.json"))
    # ints are numbers: a float key takes one
    assert load_config(None, ["contrast.sigma=1", "train.length=0.5"])["contrast"]["sigma"] == 1


def _script_mains():
    from model import ablate, demo, diagnose, evaluate, train, visualize

    tiny = os.path.join(CONFIGS, "tiny.json")
    bad = ["--set", "model.use_cl=maybe"]
    return [("train", train.main, ["--config", tiny, *bad]), ("evaluate", evaluate.main, ["--config", tiny, *bad]),
            ("demo", demo.main, bad), ("visualize", visualize.main, ["--config", tiny, *bad]),
            ("diagnose", diagnose.main, bad), ("ablate", ablate.main, ["--report-only", *bad])]


def test_scripts_print_config_errors_in_one_line(capsys, tmp_path):
    from model import pilot

    bad_file = tmp_path / "bad.json"
    bad_file.write_text(json.dumps({"model": {"use_cl": "maybe"}}))
    calls = [*_script_mains(), ("pilot", pilot.main, ["--config", str(bad_file), "--report-only"])]
    for name, main, argv in calls:
        with pytest.raises(SystemExit) as info:
            main(argv)
        err = capsys.readouterr().err
        assert info.value.code == 2, name
        assert err == 'error: config key model.use_cl must be true | false, got "maybe"\n', (name, err)


def test_the_command_line_shows_no_traceback():
    repo = os.path.dirname(CONFIGS)
    cmd = [sys.executable, "-m", "model.train", "--config", os.path.join(CONFIGS, "tiny.json"),
           "--set", "train.length=abc"]
    proc = subprocess.run(cmd, cwd=os.path.dirname(repo), capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 2
    assert proc.stderr == 'error: config key train.length must be a number >= 0, got "abc"\n', proc.stderr


def test_scripts_refuse_model_overrides(capsys):
    from model import evaluate, visualize
    from model.evaluate import model_keys_changed_by

    tiny = os.path.join(CONFIGS, "tiny.json")
    assert model_keys_changed_by(tiny, ["eval.max_images=2", "data.root=x", "contrast.delta=0.2"]) == []
    assert model_keys_changed_by(tiny, ["model.use_cl=true"]) == []  # the value it has already
    assert model_keys_changed_by(tiny, ["preset=released"]) == \
        ["model.cl_enhance", "model.cl_projector_norm", "model.mask_loss_rois"]
    for name, main in (("evaluate", evaluate.main), ("visualize", visualize.main)):
        with pytest.raises(SystemExit) as info:
            main(["--config", tiny, "--set", "model.use_cl=false", "model.fpn_channels=8", "eval.max_images=1"])
        err = capsys.readouterr().err
        assert info.value.code == 2 and err.count("\n") == 1, err
        assert err.startswith(f"error: --set model.fpn_channels, model.use_cl: {name} builds the model from the "
                              "checkpoint's config"), err


def test_schedules():
    assert contrast_weight(0, 0.25, 1.0, 100) == 0.25
    assert contrast_weight(50, 0.25, 1.0, 100) == pytest.approx(0.625)
    assert contrast_weight(500, 0.25, 1.0, 100) == 1.0
    assert lr_factor(0, [8, 11], 0, 0.001) == 1.0
    assert lr_factor(8, [8, 11], 0, 0.001) == pytest.approx(0.1)
    assert lr_factor(11, [8, 11], 0, 0.001) == pytest.approx(0.01)
    assert lr_factor(5, [100], 10, 0.0) == pytest.approx(0.5)
    cfg = load_config(os.path.join(CONFIGS, "r50_fpn_1x_nonvoc2voc.json"))
    s = Schedule(cfg["train"], cfg["contrast"], iters_per_epoch=1000)
    assert (s.max_iters, s.steps, s.lambda_warmup_iters) == (12000, [8000, 11000], 4000)


def _batch(num_images=2, size=64):
    g = torch.Generator().manual_seed(0)
    images, targets = [], []
    for i in range(num_images):
        images.append(torch.rand(3, size, size, generator=g))
        masks = torch.zeros(3, size, size, dtype=torch.uint8)
        masks[0, 8:30, 8:30] = 1
        masks[1, 30:60, 20:50] = 1
        masks[2, 5:25, 35:60] = 1
        boxes = torch.tensor([[8, 8, 30, 30], [20, 30, 50, 60], [35, 5, 60, 25]], dtype=torch.float32)
        targets.append({"boxes": boxes, "labels": torch.tensor([1, 2, 3]), "masks": masks,
                        "has_mask": torch.tensor([True, False, True])})
    return images, targets


@pytest.mark.parametrize("overrides, has_contrast", [
    (["model.use_cam=false", "model.use_cl=false"], False),   # the partially-supervised baseline
    (["model.use_cl=false"], False),                          # + CAM
    (["contrast.supervision=base"], True),
    (["contrast.supervision=novel"], True),
    (["contrast.share_queries=false", "contrast.formulation=released"], True),
    (["model.cl_convs=1", "model.cl_fcs=1", "contrast.sigma=0.6", "model.head_norm=gn"], True),
    (["model.box_reg_head=fc", "model.box_fc_channels=32"], True),  # fc box regression instead of GAP
])
def test_ablation_switches_train_and_predict(overrides, has_contrast, one_thread):
    cfg = load_config(os.path.join(CONFIGS, "tiny.json"), overrides)
    torch.manual_seed(0)
    model = build_model(cfg["model"], cfg["contrast"], num_classes=4)
    assert (model.roi_heads.cl_head is not None) == cfg["model"]["use_cl"]
    images, targets = _batch()
    losses = model(images, targets)
    assert ("loss_contrast" in losses) == has_contrast
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2 and out[0]["masks"].shape[1:] == (1, 64, 64)


def test_released_preset_is_the_authors_code():
    paper, released = load_config(None), load_config(None, ["preset=released"])
    assert (paper["contrast"]["formulation"], paper["contrast"]["scale"], paper["model"]["mask_loss_rois"]) == \
        ("paper", 1.0, "all")
    assert released["contrast"]["formulation"] == "released"
    assert (released["contrast"]["tau_easy"], released["contrast"]["tau_hard"]) == (0.3, 0.7)
    assert released["contrast"]["scale"] == 0.1
    assert released["contrast"]["lambda_schedule"] == "epoch_step"
    assert released["model"]["mask_loss_rois"] == "gt"
    assert released["preset"] == "released"
    # an override after the preset wins over it
    assert load_config(None, ["preset=released", "contrast.scale=0.5"])["contrast"]["scale"] == 0.5
    cfg = load_config(os.path.join(CONFIGS, "r50_fpn_1x_nonvoc2voc_released.json"))
    assert cfg["contrast"]["formulation"] == "released" and cfg["model"]["backbone"] == "resnet50"
    with pytest.raises(ValueError, match="preset"):
        load_config(None, ["preset=mine"])


def design_released_table():
    """(config key, value) of every row of docs/DESIGN.md's "released preset" table."""
    design = os.path.join(os.path.dirname(CONFIGS), os.pardir, "docs", "DESIGN.md")
    with open(design) as f:
        text = f.read().split("## The reference model's `released` preset", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[1].startswith("`") and cells[2].startswith("`"):
            rows.append((cells[1].strip("`"), json.loads(cells[2].strip("`"))))
    return rows


def test_released_preset_matches_designs_table():
    rows = design_released_table()
    assert len(rows) == 9 and len({key for key, _ in rows}) == len(rows)
    for config in (load_config(None, ["preset=released"]),
                   load_config(os.path.join(CONFIGS, "r50_fpn_1x_nonvoc2voc_released.json")),
                   load_config(os.path.join(CONFIGS, "r50_fpn_1x_voc2nonvoc_released.json"))):
        for key, value in rows:
            section, name = key.split(".")
            assert config[section][name] == value, f"{key}: {config[section][name]!r}, DESIGN says {value!r}"
    paper = load_config(None)
    assert sum(paper[key.split(".")[0]][key.split(".")[1]] != value for key, value in rows) >= 8


def test_lambda_stepped_once_per_epoch():
    cfg = load_config(None, ["contrast.lambda_schedule=epoch_step", "contrast.lambda_warmup=4"])
    s = Schedule(cfg["train"], cfg["contrast"], iters_per_epoch=10)
    assert [s.contrast_weight(i) for i in (0, 9)] == [0.25, 0.25]
    assert s.contrast_weight(10) == s.contrast_weight(19) == pytest.approx(0.25 + 0.75 / 4)
    assert s.contrast_weight(40) == s.contrast_weight(1000) == 1.0
    linear = Schedule(cfg["train"], dict(cfg["contrast"], lambda_schedule="linear"), iters_per_epoch=10)
    assert linear.contrast_weight(9) > 0.25
    with pytest.raises(ValueError, match="lambda_schedule"):
        Schedule(cfg["train"], dict(cfg["contrast"], lambda_schedule="cosine"), iters_per_epoch=10)


def test_sampler_seed_is_a_pure_int64_function():
    from model.engine.schedule import sampler_seed

    seeds = {sampler_seed(s, i, r) for s in range(3) for i in range(100) for r in range(2)}
    assert len(seeds) == 600
    assert all(-2**63 <= x < 2**63 for x in seeds)
    assert sampler_seed(5, 7, 1) == sampler_seed(5, 7, 1)


@pytest.mark.parametrize("given,expected", [
    ({}, "10000"),                                           # the short spin by default
    ({"GOMP_SPINCOUNT": "300000"}, "300000"),                # the user's spin count wins
    ({"OMP_WAIT_POLICY": "ACTIVE"}, None),                   # as does the user's wait policy
    ({"CONTRASTMASK_KEEP_WAIT_POLICY": "1"}, None),          # and the opt-out
])
def test_model_package_sets_a_short_openmp_spin(given, expected):
    # benchmarks/shared_machine.py: libgomp's long spin makes training 7x slower beside one busy process
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items()
           if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "CONTRASTMASK_KEEP_WAIT_POLICY")}
    env.update(given)
    out = subprocess.run([sys.executable, "-c", "import os, model; print(os.environ.get('GOMP_SPINCOUNT'))"],
                         cwd=os.path.dirname(os.path.dirname(CONFIGS)), env=env, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == str(expected)
