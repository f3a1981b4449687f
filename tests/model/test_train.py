"""Few-iteration training of the reference model on tiny shapes data (model/configs/tiny.json)."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import contrastmask_ops
from model.config import load_config
from model.contrastmask import build_model
from model.data.build import build_dataset, prepare_data
from model.data.loader import collate
from model.contrastmask.roi_heads import roi_mask_targets
from model.engine.checkpoint import load as load_checkpoint
from model.evaluate import COLUMNS, evaluate
from model.engine.metrics import read_metrics
from model.train import train
from tiny_model import REPO, TINY_CONFIG, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

EXTENSION_REQUIRED = os.environ.get("CONTRASTMASK_REQUIRE_EXTENSION") == "1"


def losses_by_iter(out_dir):
    return [r for r in read_metrics(os.path.join(out_dir, "metrics.jsonl"))]


def probe_contrastive_loss(model, images, targets):
    """L_con of the CL head on fixed ROIs (the ground-truth boxes of base instances), fixed masks and
    a fixed key sample: unlike the training log's L_con, it does not move with the number of ROIs."""
    model.eval()
    with torch.no_grad():
        image_list, targets = model.transform(list(images), [dict(t) for t in targets])
        features = model.backbone(image_list.tensors)
        rows = [torch.nonzero(t["has_mask"])[:, 0] for t in targets]
        boxes = [t["boxes"][r] for t, r in zip(targets, rows)]
        heads = model.roi_heads
        _, z = heads.cl_head(heads.cl_roi_pool(features, boxes, image_list.image_sizes))
        masks = roi_mask_targets(targets, boxes, rows, z.shape[-1])
        is_novel = torch.zeros(z.shape[0], dtype=torch.bool)
        return contrastmask_ops.query_sharing_contrastive_loss(z, masks, None, is_novel, seed=0).item()


def test_training_lowers_losses_then_evaluates(data_root, tmp_path):
    # the same two unflipped images every iteration: the losses should fall
    out = str(tmp_path / "run")
    cfg = tiny_config(str(tmp_path / "two_images"), out, "train.length=12", "data.shapes.num_train=2",
                      "train.flip_prob=0")
    prepare_data(cfg["data"])
    dataset = build_dataset(cfg["data"], "train")
    images, targets = collate([dataset[i] for i in range(2)])
    assert sum(int(t["has_mask"].sum()) for t in targets) > 0
    torch.manual_seed(cfg["seed"])
    initial = build_model(cfg["model"], cfg["contrast"], dataset.num_classes)
    probe_before = probe_contrastive_loss(initial, images, targets)

    final = train(cfg, progress=False)
    assert final["iteration"] == 12
    if EXTENSION_REQUIRED or contrastmask_ops.build_info()["cpu"]:
        assert final["contrast_backend"] == "compiled"
    records = losses_by_iter(out)
    assert [r["iter"] for r in records] == list(range(1, 13))
    names = ["loss", "loss_classifier", "loss_box_reg", "loss_mask", "loss_contrast", "loss_objectness",
             "loss_rpn_box_reg"]
    for r in records:
        assert all(math.isfinite(r[n]) for n in names), r
    # loss_box_reg starts near 0 (the first positives are the ground-truth boxes), so it is not
    # expected to fall; L_con of the log grows with the number of positive ROIs (and its keys change every
    # iteration), so it is checked by the probe on fixed ROIs and keys below, not by the log
    for name in ["loss", "loss_classifier", "loss_mask", "loss_objectness"]:
        first = sum(r[name] for r in records[:3]) / 3
        last = sum(r[name] for r in records[-3:]) / 3
        assert last < first, f"{name}: {first:.4f} -> {last:.4f}"
    initial.load_state_dict(load_checkpoint(os.path.join(out, "checkpoint.pt"))["model"])
    probe_after = probe_contrastive_loss(initial, images, targets)
    assert probe_after < probe_before
    assert os.path.exists(os.path.join(out, "loss.png"))

    record = evaluate(cfg, progress=False)
    assert record["iteration"] == 12
    assert record["novel_categories"] == ["ellipse", "hexagon", "ring", "heart", "crescent"]
    for split in ("novel", "base"):
        for kind in ("segm", "bbox"):
            metrics = record["metrics"][split][kind]
            assert list(metrics) == COLUMNS
            assert all(isinstance(v, float) and -1.0 <= v <= 1.0 for v in metrics.values()), metrics
    assert json.load(open(os.path.join(out, "eval.json")))["metrics_percent"]["novel"]["segm"].keys() == set(COLUMNS)


def _one_batch_losses(cfg, images, targets, seed=0):
    torch.manual_seed(seed)
    model = build_model(cfg["model"], cfg["contrast"], 11).train()
    torch.manual_seed(seed + 1)
    return model(list(images), [dict(t) for t in targets])


def test_forward_runs_the_compiled_operator(data_root, tmp_path):
    if not contrastmask_ops.build_info()["cpu"]:
        pytest.skip("extension not built")
    cfg = tiny_config(data_root, tmp_path)
    images, targets = collate([build_dataset(cfg["data"], "train")[i] for i in range(2)])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        losses = _one_batch_losses(cfg, images, targets)
        losses["loss_contrast"].backward()
    names = {e.key for e in prof.key_averages()}
    assert "contrastmask::roi_plan" in names and "contrastmask::contrastive_loss" in names, sorted(names)[:50]


def test_box_only_masks_never_reach_a_loss(data_root, tmp_path):
    """Garbage in the mask rows of box-only instances leaves every loss bit-identical."""
    cfg = tiny_config(data_root, tmp_path)
    dataset = build_dataset(cfg["data"], "train")
    images, targets = collate([dataset[i] for i in range(2)])
    assert any((~t["has_mask"]).any() for t in targets) and any(t["has_mask"].any() for t in targets)
    g = torch.Generator().manual_seed(123)
    garbage = []
    for t in targets:
        t = dict(t)
        noise = (torch.rand(t["masks"].shape, generator=g) < 0.5).to(torch.uint8)
        t["masks"] = torch.where(t["has_mask"][:, None, None], t["masks"], noise)
        garbage.append(t)
    clean = _one_batch_losses(cfg, images, targets)
    dirty = _one_batch_losses(cfg, images, garbage)
    assert set(clean) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_contrast", "loss_objectness",
                          "loss_rpn_box_reg"}
    for name in clean:
        assert torch.equal(clean[name], dirty[name]), name
    # and the test can fail: garbage in a base row does change the mask loss
    flipped = [dict(t, masks=1 - t["masks"]) for t in targets]
    assert not torch.equal(_one_batch_losses(cfg, images, flipped)["loss_mask"], clean["loss_mask"])


def test_novel_masks_in_the_file_change_nothing(data_root, tmp_path):
    """Training on a copy of the data whose novel masks are garbage gives bit-identical losses."""
    import shutil

    from model.data import shapes

    garbage_root = tmp_path / "garbage"
    shutil.copytree(data_root, garbage_root)
    ann_path = shapes.annotation_path(str(garbage_root), "train", tiny_config(data_root, tmp_path)["data"]["shapes"])
    data = json.load(open(ann_path))
    novel_ids = {c["id"] for c in data["categories"] if c["name"] in shapes.NOVEL_CATEGORIES}
    changed = 0
    for ann in data["annotations"]:
        if ann["category_id"] in novel_ids:
            w, h = data["images"][0]["width"], data["images"][0]["height"]
            ann["segmentation"] = [[0, 0, w, 0, w / 2, h]]  # a big wrong triangle
            changed += 1
    assert changed
    json.dump(data, open(ann_path, "w"))
    runs = {}
    for name, root in (("clean", data_root), ("garbage", str(garbage_root))):
        cfg = tiny_config(root, str(tmp_path / name), "train.length=3")
        runs[name] = train(cfg, progress=False)
    clean, dirty = losses_by_iter(str(tmp_path / "clean")), losses_by_iter(str(tmp_path / "garbage"))
    strip = lambda rs: [{k: v for k, v in r.items() if k != "sec_per_iter"} for r in rs]  # noqa: E731
    assert strip(clean) == strip(dirty)
    assert runs["clean"]["rank_weight_digests"] == runs["garbage"]["rank_weight_digests"]


def test_resume_continues_exactly(data_root, tmp_path):
    straight = train(tiny_config(data_root, str(tmp_path / "straight"), "train.length=4"), progress=False)
    half = tiny_config(data_root, str(tmp_path / "halves"), "train.length=2")
    first = train(half, progress=False)
    assert first["rank_weight_digests"] != straight["rank_weight_digests"]
    saved = torch.load(tmp_path / "halves" / "checkpoint.pt", weights_only=True)  # data only, no pickled objects
    assert saved["iteration"] == 2 and isinstance(saved["rng"][0]["numpy"]["keys"], torch.Tensor)
    half["train"]["length"] = 4
    resumed = train(half, resume="auto", progress=False)
    assert resumed["iteration"] == 4
    assert resumed["rank_weight_digests"] == straight["rank_weight_digests"]
    assert [r["loss"] for r in losses_by_iter(str(tmp_path / "halves"))] == \
        [r["loss"] for r in losses_by_iter(str(tmp_path / "straight"))]


def test_two_process_ddp_on_cpu_agrees_on_weights(data_root, tmp_path):
    """Two processes (contrast.global_queries null: global queries over both) train and agree on weights."""
    cfg = tiny_config(data_root, str(tmp_path / "ddp"), "train.length=3")
    cfg_path = tmp_path / "ddp.json"
    cfg_path.write_text(json.dumps(cfg))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "model.train", "--config", str(cfg_path), "--threads", "1", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    final = json.load(open(tmp_path / "ddp" / "final.json"))
    assert final["world_size"] == 2 and final["iteration"] == 3
    digests = final["rank_weight_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert final["contrast_queries"] == "global"
    assert "train: 2 process(es), contrastive queries: global" in proc.stdout, proc.stdout[-2000:]
    losses = [r["loss_contrast"] for r in losses_by_iter(str(tmp_path / "ddp"))]
    assert len(losses) == 3 and all(math.isfinite(v) and v > 0 for v in losses)


@pytest.mark.parametrize("setting,world_size,mode", [(None, 1, "global"), (None, 2, "global"), (True, 1, "global"),
                                                     (False, 1, "global"), (False, 2, "per_process")])
def test_contrast_global_queries_setting(setting, world_size, mode):
    from model.engine.distributed import DistInfo
    from model.train import contrast_queries_mode

    cfg = load_config(TINY_CONFIG, [f"contrast.global_queries={'null' if setting is None else str(setting).lower()}"])
    assert contrast_queries_mode(cfg, DistInfo(world_size=world_size)) == mode
    cfg["model"]["use_cl"] = False
    assert contrast_queries_mode(cfg, DistInfo(world_size=world_size)) is None


def test_contrast_trains_only_the_cl_head(data_root, tmp_path):
    """L_con's gradient reaches the CL head and nothing else (its input is detached), and with the
    training loop's sampler seed the loss takes no number from torch's global generator, so adding it
    leaves the proposal and ROI sampling of the whole run unchanged."""
    cfg = tiny_config(data_root, tmp_path)
    images, targets = collate([build_dataset(cfg["data"], "train")[i] for i in range(2)])

    def training_forward(cfg):
        """The model of cfg (built after seed 0, with the training loop's sampler seed) and its training losses
        on the two images (after seed 1)."""
        torch.manual_seed(0)
        model = build_model(cfg["model"], cfg["contrast"], 11).train()
        model.roi_heads.sampler_seed = 12345
        torch.manual_seed(1)
        return model, model(list(images), [dict(t) for t in targets])

    model, losses = training_forward(cfg)
    params = dict(model.named_parameters())

    def reached_by(loss, **grad_kw):
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True, **grad_kw)
        return {name for name, g in zip(params, grads) if g is not None and g.abs().sum() > 0}

    reached = reached_by(losses["loss_contrast"], retain_graph=True)
    assert reached and all(name.startswith("roi_heads.cl_head.") for name in reached), sorted(reached)
    assert any(name.startswith("roi_heads.cl_head.projector") for name in reached)
    # the mask loss, by contrast, reaches the backbone (through X) and the CL encoder (through the fused Y)
    reached = reached_by(losses["loss_mask"])
    assert any(n.startswith("backbone.") for n in reached) and any(n.startswith("roi_heads.cl_head.encoder") for n in reached)
    # the global generator: the same state after a training forward with and without the CL head
    states = []
    for use_cl in (True, False):
        training_forward(tiny_config(data_root, tmp_path, f"model.use_cl={str(use_cl).lower()}"))
        states.append(torch.get_rng_state())
    assert torch.equal(states[0], states[1])


def test_diagnose_reports_what_the_loss_reaches(data_root, tmp_path, capsys):
    from model import diagnose

    diagnose.main(["--config", TINY_CONFIG, "--set", f"data.root={data_root}", "--iters", "2", "--every", "1"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["iter"] for r in rows] == [0, 1]
    for r in rows:
        assert r["gbb_loss_contrast"] == 0.0
        assert r["gbb_loss_mask"] > 0 and r["gbb_loss_classifier"] > 0
        assert r["x_rms"] > 0 and r["fused_y_rms"] > 0


def test_diagnose_probes_write_rows_and_a_summary(data_root, tmp_path):
    # E2's probe leaves the CL head's input attached: only there does L_con reach the backbone
    from model import diagnose

    out = tmp_path / "probes"
    diagnose.main(["--config", TINY_CONFIG, "--set", f"data.root={data_root}", "--iters", "2", "--every", "1",
                   "--probes", "released", "paper_attached", "--results", str(out)])
    rows = {name: [json.loads(line) for line in open(out / f"{name}.jsonl")] for name in ("released", "paper_attached")}
    assert [r["iter"] for r in rows["released"]] == [0, 1]
    assert all(r["gbb_loss_contrast"] == 0.0 for r in rows["released"])
    assert all(r["gbb_loss_contrast"] > 0.0 for r in rows["paper_attached"])
    summary = open(str(out) + ".md").read()
    assert "| released |" in summary and "| paper_attached |" in summary and "| cam |" not in summary
