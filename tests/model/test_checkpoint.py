"""Checkpoints are data, not code: weights-only loading, clear refusals, crash-safe writes,
loud backbone-weight mismatches, and exact resume after a SIGKILL."""
import json
import os
import pathlib
import pickle
import random
import signal
import subprocess
import sys
import time
import warnings
import zipfile

import numpy as np
import pytest
import torch

from model.contrastmask.backbone import build_backbone
from model.engine import checkpoint as ckpt
from model.engine.checkpoint import CheckpointError
from model.evaluate import evaluate
from model.train import train
from tiny_model import REPO, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


class Payload:
    """Unpickling this creates `marker` (what a malicious checkpoint would do, harmlessly)."""

    def __init__(self, marker):
        self.marker = pathlib.Path(marker)

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def payload_files(tmp_path):
    """A torch.save zip that looks like one of our checkpoints and a plain pickle, both with a payload."""
    marker = tmp_path / "payload_ran"
    zipped = tmp_path / "evil_checkpoint.pt"
    torch.save({"format": ckpt.FORMAT, "model": Payload(marker), "iteration": 1}, zipped)
    raw = tmp_path / "evil.pkl"
    with open(raw, "wb") as f:
        pickle.dump({"model": Payload(marker)}, f, protocol=2)
    return marker, zipped, raw


def test_payload_is_live_when_unpickled_plainly(tmp_path):
    """The crafted files really would run code: plain pickle creates the marker (so the refusals
    below are meaningful)."""
    marker, zipped, raw = payload_files(tmp_path)
    with zipfile.ZipFile(zipped) as z:
        pickle.loads(z.read(next(n for n in z.namelist() if n.endswith("data.pkl"))))
    assert marker.exists()
    marker.unlink()
    with open(raw, "rb") as f:
        pickle.load(f)
    assert marker.exists()


def test_a_pickle_payload_is_refused_unrun(data_root, tmp_path):
    marker, zipped, raw = payload_files(tmp_path)
    for path in (zipped, raw):
        with pytest.raises(CheckpointError) as err:
            ckpt.load(str(path))
        assert str(path) in str(err.value) and "nothing in it was run" in str(err.value)
    assert "Unsupported global" in str(pytest.raises(CheckpointError, ckpt.load, str(zipped)).value)
    cfg = tiny_config(data_root, str(tmp_path / "run"), "train.length=1")
    with pytest.raises(CheckpointError, match="evil_checkpoint.pt"):
        evaluate(cfg, checkpoint_path=str(zipped), progress=False)  # evaluate (and visualize: same loader)
    with pytest.raises(CheckpointError, match="evil_checkpoint.pt"):
        train(cfg, resume=str(zipped), progress=False)
    with pytest.raises(CheckpointError, match="evil.pkl"):
        build_backbone("resnet18", weights=str(raw))
    assert not marker.exists()


def saved_checkpoint(path, weights):
    """path, where a current-format checkpoint of iteration 3 holding the model weights is saved."""
    ckpt.save_atomic({"format": ckpt.FORMAT, "model": {"w": weights}, "iteration": 3}, str(path))
    return path


def test_bad_files_give_a_clear_error(data_root, tmp_path):
    good = saved_checkpoint(tmp_path / "good.pt", torch.randn(1000))
    assert ckpt.load(str(good))["iteration"] == 3
    data = good.read_bytes()
    cases = {"truncated.pt": (data[: len(data) // 2], "truncated or corrupt"),
             "empty.pt": (b"", "empty"),
             "text.pt": (b"not a checkpoint\n", "not a torch.save file")}
    for name, (content, words) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=words) as err:
            ckpt.load(str(tmp_path / name))
        assert str(tmp_path / name) in str(err.value)
    torch.save({"w": torch.zeros(2)}, tmp_path / "state_dict.pt")  # loadable, but not a checkpoint of ours
    with pytest.raises(CheckpointError, match="not a model.train checkpoint"):
        ckpt.load(str(tmp_path / "state_dict.pt"))
    with pytest.raises(CheckpointError, match="does not exist"):
        ckpt.load(str(tmp_path / "missing.pt"))
    with pytest.raises(CheckpointError, match=r"lacks \['optimizer'"):
        ckpt.load(str(good), require=ckpt.TRAINING_KEYS)

    # resuming from a corrupt checkpoint is an error, not a fresh start
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        train(tiny_config(data_root, str(out), "train.length=1"), resume="auto", progress=False)
    assert not (out / "final.json").exists()


def test_rng_states_round_trip_exactly(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached second Gaussian (gauss_next) in Python's state ...
    np.random.standard_normal()  # ... and numpy's (has_gauss, cached_gaussian)
    path = str(tmp_path / "rng.pt")
    ckpt.save_atomic({"rng": [ckpt.rng_state()]}, path)
    expected = (random.random(), random.gauss(0, 1), np.random.standard_normal(), np.random.rand(3).tolist(),
                torch.rand(3))
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    state = torch.load(path, weights_only=True)["rng"][0]
    assert state["python"]["gauss_next"] is not None and state["numpy"]["has_gauss"] == 1
    ckpt.set_rng_state(state)
    got = (random.random(), random.gauss(0, 1), np.random.standard_normal(), np.random.rand(3).tolist(),
           torch.rand(3))
    assert got[:4] == expected[:4] and torch.equal(got[4], expected[4])


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def test_old_checkpoints_are_refused_and_upgrade(tmp_path):
    random.gauss(0, 1)
    np.random.standard_normal()
    current = ckpt.rng_state()  # reading a state does not advance it: the older layout of the same states
    legacy = {"python": random.getstate(), "numpy": np.random.get_state(legacy=True), "torch": torch.get_rng_state()}
    common = {"model": {"w": torch.arange(3.0)}, "optimizer": {"state": {}, "param_groups": []},
              "scheduler": {"last_epoch": 2}, "scaler": {}, "iteration": 2, "config": {"seed": 0}}
    old, new = tmp_path / "old.pt", tmp_path / "new.pt"
    torch.save(dict(common, rng=[legacy]), old)  # the legacy layout: numpy's state an ndarray
    with pytest.raises(CheckpointError, match="numpy.*model.engine.checkpoint upgrade"):
        ckpt.load(str(old))
    ckpt.main(["upgrade", str(old), str(new)])
    state = ckpt.load(str(new), require=ckpt.TRAINING_KEYS)
    assert _same(state["rng"][0], current)
    assert _same({k: state[k] for k in common}, common)

    marker, zipped, _ = payload_files(tmp_path)  # the upgrade path is weights-only too
    torch.save({"model": Payload(marker)}, zipped)
    with pytest.raises(CheckpointError, match="nothing in it was run"):
        ckpt.upgrade_legacy(str(zipped), str(tmp_path / "x.pt"))
    assert not marker.exists()


def test_upgrading_a_current_file_writes_nothing(tmp_path, capsys):
    current = saved_checkpoint(tmp_path / "current.pt", torch.ones(2))
    before = current.read_bytes()
    ckpt.main(["upgrade", str(current), str(tmp_path / "new.pt")])  # returns: exit status 0
    out = capsys.readouterr().out
    assert out == f"{current} is already a current model.train checkpoint ({ckpt.FORMAT}): nothing to upgrade, " \
                  f"nothing written\n"
    assert current.read_bytes() == before and not (tmp_path / "new.pt").exists()
    # a file that is neither: one line on stderr, status 2
    (tmp_path / "foreign.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as info:
        ckpt.main(["upgrade", str(tmp_path / "foreign.pt")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith("error: legacy checkpoint") and err.count("\n") == 1, err


def test_writes_fsync_and_clean_temporaries(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pt")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = [f"{path}.tmp.{dead.pid}", f"{path}.tmp.{os.getpid()}", f"{path}.tmp.junk"]
    alive = f"{path}.tmp.{os.getppid()}"  # a live writer's file is left alone
    for name in stale + [alive, str(tmp_path / "other.pt.tmp.1")]:
        pathlib.Path(name).write_bytes(b"half a checkpoint")

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.realpath(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    ckpt.save_atomic({"format": ckpt.FORMAT, "model": {"w": torch.ones(3)}}, path)
    tmp = os.path.realpath(f"{path}.tmp.{os.getpid()}")
    assert events == [("fsync", tmp), ("replace", os.path.realpath(path)), ("fsync", os.path.realpath(tmp_path))]
    assert not any(os.path.exists(name) for name in stale)
    assert os.path.exists(alive) and os.path.exists(tmp_path / "other.pt.tmp.1")
    assert torch.equal(ckpt.load(path)["model"]["w"], torch.ones(3))


def test_weights_by_path_report_mismatches(tmp_path):
    torch.manual_seed(5)
    source = build_backbone("resnet18").body
    full = {k: v.clone() for k, v in source.state_dict().items()}
    full.update({"fc.weight": torch.randn(1000, 512), "fc.bias": torch.randn(1000)})  # a whole ResNet's file
    torch.save(full, tmp_path / "resnet18.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an exact match is silent
        loaded = build_backbone("resnet18", weights=str(tmp_path / "resnet18.pt")).body
    assert torch.equal(loaded.conv1.weight, source.conv1.weight)
    assert torch.equal(loaded.layer4[1].conv2.weight, source.layer4[1].conv2.weight)

    partial = {k: v for k, v in full.items() if not k.startswith("layer4.")}
    partial["head.extra"] = torch.zeros(1)
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.warns(UserWarning, match=r"partial.pt.*missing.*layer4\.0\.conv1\.weight.*unexpected.*head\.extra"):
        build_backbone("resnet18", weights=str(tmp_path / "partial.pt"))

    torch.save({"encoder." + k: v for k, v in full.items()}, tmp_path / "prefixed.pt")
    with pytest.raises(CheckpointError, match="prefixed.pt.*match none"):
        build_backbone("resnet18", weights=str(tmp_path / "prefixed.pt"))
    torch.save({"conv1.weight": torch.zeros(3, 3)}, tmp_path / "wrong_shape.pt")
    with pytest.raises(CheckpointError, match="wrong_shape.pt.*do not fit"):
        build_backbone("resnet18", weights=str(tmp_path / "wrong_shape.pt"))


def _wait_for_new_checkpoint(path, before, proc, log, deadline):
    """Polls until path is replaced by a new file (new inode/mtime); returns its identity."""
    while time.time() < deadline:
        try:
            st = os.stat(path)
            ident = (st.st_ino, st.st_mtime_ns)
            if ident != before:
                return ident
        except FileNotFoundError:
            pass
        if proc.poll() is not None:
            pytest.fail(f"training exited ({proc.returncode}) before it was killed:\n{log.read_text()[-3000:]}")
        time.sleep(0.005)
    pytest.fail(f"no new checkpoint in time:\n{log.read_text()[-3000:]}")


def test_resume_after_two_sigkills_is_exact(data_root, tmp_path):
    length = 4
    straight = train(tiny_config(data_root, str(tmp_path / "straight"), f"train.length={length}"), progress=False)

    out = tmp_path / "killed"
    cfg = tiny_config(data_root, str(out), f"train.length={length}", "train.checkpoint_every=1")
    cfg_path = tmp_path / "killed.json"
    cfg_path.write_text(json.dumps(cfg))
    cmd = [sys.executable, "-m", "model.train", "--config", str(cfg_path), "--threads", "1", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    path, log = str(out / "checkpoint.pt"), tmp_path / "train.log"
    ident, iterations = None, []
    for attempt in range(3):  # killed right after its 1st new checkpoint, again, then runs to the end
        with open(log, "a") as f:
            proc = subprocess.Popen(cmd + (["--resume"] if attempt else []), cwd=REPO, env=env, stdout=f,
                                    stderr=subprocess.STDOUT)
        try:
            if attempt < 2:
                ident = _wait_for_new_checkpoint(path, ident, proc, log, time.time() + 120)
                proc.send_signal(signal.SIGKILL)
                assert proc.wait(timeout=30) == -signal.SIGKILL
                state = torch.load(path, weights_only=True)  # whatever the kill interrupted, this is whole
                iterations.append(state["iteration"])
                assert state["iteration"] < length
            else:
                assert proc.wait(timeout=180) == 0, log.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert iterations[0] < iterations[1] < length, iterations
    final = json.load(open(out / "final.json"))
    assert final["iteration"] == length
    assert final["contrast_backend"] == straight["contrast_backend"]
    assert final["rank_weight_digests"] == straight["rank_weight_digests"]
    assert not [n for n in os.listdir(out) if ".tmp." in n]
