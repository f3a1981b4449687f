"""The ablation runner on the tiny config: two arms, one seed, then resume and report."""
import json
import os

import pytest

from model import ablate
from tiny_model import REPO, TINY_CONFIG

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def test_two_arms_then_a_rerun_trains_nothing(tmp_path):
    results = str(tmp_path / "results" / "ablation-tiny.json")
    argv = ["--config", TINY_CONFIG, "--arms", "cam", "cam_cl_released", "--seeds", "0",
            "--out-dir", str(tmp_path / "runs"), "--results", results,
            "--set", f"data.root={tmp_path / 'data'}", "train.length=2"]
    record = ablate.main(argv)
    assert [(r["arm"], r["seed"]) for r in record["runs"]] == [("cam", 0), ("cam_cl_released", 0)]
    for run in record["runs"]:
        m = run["metrics"]
        assert m["iterations"] == 2
        assert set(m["detected"]) == {"novel", "base"} and set(m["gt_boxes"]) == {"novel", "base"}
        assert 0.0 <= m["gt_boxes"]["novel"]["cam_auc"] <= 1.0
    released = json.load(open(tmp_path / "runs" / "cam_cl_released" / "seed0" / "config.json"))
    assert released["contrast"]["formulation"] == "released" and released["model"]["mask_loss_rois"] == "gt"
    assert json.load(open(tmp_path / "runs" / "cam" / "seed0" / "config.json"))["model"]["use_cl"] is False
    assert os.path.exists(results) and os.path.exists(results[:-5] + ".md") and os.path.exists(results[:-5] + ".png")
    assert "| cam |" in open(results[:-5] + ".md").read()
    # resumable: finished runs are not trained again (their checkpoints are not rewritten)
    ckpt = tmp_path / "runs" / "cam" / "seed0" / "checkpoint.pt"
    stamp = os.stat(ckpt).st_mtime_ns
    again = ablate.main(argv)
    assert os.stat(ckpt).st_mtime_ns == stamp
    assert again["runs"] == record["runs"]
    # a fresh checkout has only the committed results file: its runs count as finished, nothing trains
    import shutil

    shutil.rmtree(tmp_path / "runs")
    fresh = ablate.main(argv)
    assert fresh["runs"] == record["runs"]
    assert not (tmp_path / "runs" / "cam" / "seed0" / "checkpoint.pt").exists()


def test_the_protocol_names_the_resolved_config():
    # A results file recorded with another model in the same config file must not be carried over.
    from model.config import load_config

    base = load_config(TINY_CONFIG, [])
    changed = load_config(TINY_CONFIG, ["model.box_cls_kernel=1"])
    reseeded = load_config(TINY_CONFIG, ["seed=7", "output_dir=elsewhere"])
    protocol = lambda cfg: ablate.describe_protocol(TINY_CONFIG, [], cfg, ["cam"], [0])
    assert protocol(base) != protocol(changed)
    assert protocol(base) == protocol(reseeded)


def test_each_study_fixes_its_config_and_arms():
    from model.config import load_config

    v2, v3 = ablate.STUDIES["v2"], ablate.STUDIES["v3"]
    assert len(v3.arms) >= 6 and "cam_gtrois" in v3.arms and set(v2.arms) < set(v3.arms)
    config = lambda study, arm: ablate.run_config(os.path.join(ablate.CONFIG_DIR, study.config), arm, 0,  # noqa: E731
                                                  "runs", (), study)
    # v2's committed runs had neither enhance_op nor the projector's BatchNorm: its released arm keeps them off
    old, new = config(v2, "cam_cl_released"), config(v3, "cam_cl_released")
    assert (old["model"]["cl_enhance"], old["model"]["cl_projector_norm"]) == (False, None)
    assert (new["model"]["cl_enhance"], new["model"]["cl_projector_norm"]) == (True, "bn")
    assert old["contrast"]["formulation"] == new["contrast"]["formulation"] == "released"
    control = config(v3, "cam_gtrois")
    assert control["model"]["mask_loss_rois"] == "gt" and not control["model"]["use_cl"] and control["model"]["use_cam"]
    probe = load_config(os.path.join(ablate.CONFIG_DIR, v3.config))
    protocol = ablate.describe_protocol(os.path.join(ablate.CONFIG_DIR, v3.config), [], probe, v3.arms, [0, 1, 2])
    assert "backbone mobilenet_v2 (imagenet, frozen_bn" in protocol and "optimizer " in protocol


def test_decision_rule():
    def summary(a_values, b_values):
        from statistics import fmean, stdev

        mk = lambda vs: {"x": {"mean": fmean(vs), "std": stdev(vs) if len(vs) > 1 else None,  # noqa: E731
                               "values": dict(enumerate(vs))}}
        return {"a": mk(a_values), "b": mk(b_values)}

    assert ablate.decide(summary([2, 3, 4], [1, 2, 3]), "a", "b", "x")["verdict"] == "holds"  # every pair
    assert ablate.decide(summary([1, 2, 3], [2, 3, 4]), "a", "b", "x")["verdict"] == "reversed"
    assert ablate.decide(summary([5, 1, 3], [3, 2, 4]), "a", "b", "x")["verdict"] == "not shown"
    assert ablate.decide(summary([30, 31, 10], [1, 2, 3]), "a", "b", "x")["verdict"] == "holds"  # by every pair
    assert ablate.decide(summary([3], [1]), "a", "b", "x")["verdict"] == "too few seeds"


@pytest.mark.parametrize("study", ["v2", "v3"])
def test_results_match_their_report_and_readme(study):
    # The README's ablation tables are what `python -m model.ablate --report-only` prints from the
    # committed results files, and each committed .md is that report: neither may drift from the data.
    stem = os.path.join(REPO, "model", "results", f"ablation-shapes-category-{study}")
    with open(stem + ".json") as f:
        record = json.load(f)
    arms = list(record["arms"])
    # Every arm has its 3 seeds; v3 is the pretrained study, and says so in its protocol.
    assert sorted((r["arm"], r["seed"]) for r in record["runs"]) == sorted((a, s) for a in arms for s in (0, 1, 2))
    assert ("backbone mobilenet_v2 (imagenet" in record["protocol"]) == (study == "v3")
    summary = ablate.summarize(record["runs"], arms)
    report = ablate.format_report(summary, ablate.decide_all(summary), arms, record["protocol"])
    with open(stem + ".md") as f:
        assert f.read() == report
    table = [line for line in report.splitlines() if line.startswith("| ") and " ± " in line]
    assert len(table) == len(arms)
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    for line in table:
        assert line in readme, f"README's ablation table is out of date: {line}"


def test_another_configs_folder_is_left_alone(tmp_path):
    # e.g. runs/ of an older checkout: same arm and seed, another model
    out_root = str(tmp_path / "runs")
    extra = [f"data.root={tmp_path / 'data'}"]
    cfg = ablate.run_config(TINY_CONFIG, "cam", 0, out_root, extra)
    other = ablate.run_config(TINY_CONFIG, "cam", 0, out_root, [*extra, "model.box_cls_kernel=1"])
    os.makedirs(cfg["output_dir"])
    with open(os.path.join(cfg["output_dir"], "config.json"), "w") as f:
        json.dump(other, f)
    with open(os.path.join(cfg["output_dir"], "result.json"), "w") as f:
        json.dump({"stale": True}, f)
    assert not ablate.folder_holds(cfg["output_dir"], cfg)
    recorded = {("cam", 0): {"recorded": True}}
    runs = ablate.collect(TINY_CONFIG, ["cam"], [0], out_root, extra, recorded)
    assert runs == [{"arm": "cam", "seed": 0, "metrics": {"recorded": True}}]
    with pytest.raises(RuntimeError, match="another config"):
        ablate.run_one(cfg)
    # a config.json without a key whose default is null is the same config, so this run's folder
    with open(os.path.join(cfg["output_dir"], "config.json"), "w") as f:
        json.dump({**cfg, "contrast": {k: v for k, v in cfg["contrast"].items() if k != "global_queries"}}, f)
    assert ablate.folder_holds(cfg["output_dir"], cfg)
    assert ablate.collect(TINY_CONFIG, ["cam"], [0], out_root, extra, recorded)[0]["metrics"] == {"stale": True}


def test_a_null_key_does_not_change_the_digest():
    from model.config import load_config

    cfg = load_config(TINY_CONFIG, [])
    without = {**cfg, "contrast": {k: v for k, v in cfg["contrast"].items() if k != "global_queries"}}
    assert cfg["contrast"]["global_queries"] is None
    assert ablate.config_digest(cfg) == ablate.config_digest(without)
    assert ablate.config_digest(cfg) != ablate.config_digest({**cfg, "contrast": {**cfg["contrast"],
                                                                                   "global_queries": True}})
