"""Checkpoints are data, not code: every file is read with torch.load(weights_only=True), so a
checkpoint someone shared cannot run a pickle payload. Everything in one is a tensor or plain data:
the RNG states (Python's `random`, numpy's, torch's CPU and CUDA generators) as tensors and numbers,
the config as JSON-able dicts and lists. --resume restores every one of them exactly.

Writes are crash-safe: a temporary file, flushed and fsync'd, then os.replace, then an fsync of the
folder, so a killed run or a power loss leaves the old checkpoint or the new one, never half of one.
"""
import hashlib
import json
import os
import pickle
import random
import re
import sys
import warnings

import numpy as np
import torch

from .locks import pid_alive

FORMAT = "contrastmask-checkpoint/1"  # the "format" entry of every checkpoint model.train writes
TRAINING_KEYS = ("model", "optimizer", "scheduler", "scaler", "rng", "iteration")


class CheckpointError(RuntimeError):
    """A file that cannot be (or must not be) loaded as a checkpoint; the message names the file."""


# ---------------------------------------------------------------------------------------- RNG states

def rng_state():
    """Every RNG state as tensors and plain numbers (weights_only-loadable)."""
    version, mt, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state = {
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss_next": gauss_next},
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    py, npy = state["python"], state["numpy"]
    random.setstate((int(py["version"]), tuple(int(v) for v in py["state"].tolist()), py["gauss_next"]))
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), int(npy["pos"]),
                         int(npy["has_gauss"]), float(npy["cached_gaussian"])))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------ writing

def _fsync_dir(directory):
    if os.name != "posix":  # no directory handles to fsync elsewhere
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temporaries(path):
    """Deletes PATH.tmp.<pid> files left by killed writers (ours, or of processes no longer alive)."""
    directory, base = os.path.split(os.path.abspath(path))
    prefix = base + ".tmp."
    removed = []
    for name in os.listdir(directory):
        if not name.startswith(prefix):
            continue
        suffix = name[len(prefix):]
        if suffix.isdigit() and int(suffix) != os.getpid() and pid_alive(int(suffix)):
            continue  # another live process is writing it right now
        try:
            os.remove(os.path.join(directory, name))
            removed.append(name)
        except FileNotFoundError:
            pass
    return removed


def save_atomic(obj, path):
    """torch.save to PATH.tmp.<pid>, flush + fsync, os.replace onto path, fsync the folder."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # readers see the old file or the new one, never half of one
    except BaseException:
        try:
            os.remove(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(directory)  # the rename itself reaches the disk


def training_checkpoint(model, optimizer, scheduler, scaler, rngs, iteration, config):
    """The dict model.train saves: tensors and plain data only."""
    return {"format": FORMAT, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": list(rngs),
            "iteration": int(iteration), "config": json.loads(json.dumps(config))}


# ------------------------------------------------------------------------------------------ reading

def load_tensors(path, what="file", map_location="cpu"):
    """torch.load(path, weights_only=True), with the reasons it can fail turned into one CheckpointError
    that names the file: missing, truncated or not a torch.save file, or carrying pickled objects
    (code) beyond tensors and plain data. Nothing in the file is executed."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{what} {path!r} does not exist" if not os.path.exists(path) else
                              f"{what} {path!r} is not a file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{what} {path!r} is empty (0 bytes): an interrupted write, not a checkpoint")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # the weights-only unpickler stopped at something that is not a tensor or plain data; it ran nothing
        found = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\.\s|\n|$)", str(e))
        detail = found.group(1).strip() if found else str(e).strip().splitlines()[0]
        if "Unsupported global" in detail or "allowlisted" in detail:
            raise CheckpointError(
                f"{what} {path!r} refused: its pickle builds or calls objects other than tensors and plain data "
                f"({detail}); nothing in it was run (loaded with weights_only=True). Checkpoints of this project "
                f"hold tensors and plain data only; one written by an older version (numpy RNG states) can be "
                f"converted: python -m model.engine.checkpoint upgrade FILE [NEW_FILE]") from None
        raise CheckpointError(f"{what} {path!r} is not a torch.save file of tensors and plain data, or is "
                              f"corrupt ({detail}); nothing in it was run (loaded with weights_only=True)") from None
    except Exception as e:  # zip reader (truncated, not a zip), legacy reader (garbage bytes), EOF ...
        message = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"{what} {path!r} is not a readable torch.save file (truncated or corrupt?): "
                              f"{type(e).__name__}: {message}") from None


def _check_state_dict(sd, path, what, key):
    if not isinstance(sd, dict) or not sd or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                     for k, v in sd.items()):
        raise CheckpointError(f"{what} {path!r}: {key!r} is not a state_dict (a mapping of names to tensors)")


def load(path, map_location="cpu", require=("model",)):
    """A checkpoint written by model.train: weights-only load, then checked to be one of ours with the
    entries `require` names (resume needs TRAINING_KEYS). Raises CheckpointError otherwise."""
    what = "checkpoint"
    state = load_tensors(path, what, map_location)
    if not isinstance(state, dict):
        raise CheckpointError(f"{what} {path!r} is not a model.train checkpoint: it holds a "
                              f"{type(state).__name__}, not a dict")
    if state.get("format") != FORMAT:
        found = (f"format {state['format']!r}" if "format" in state else
                 f"no 'format' entry (keys: {sorted(map(str, state))[:8]})")
        raise CheckpointError(f"{what} {path!r} is not a model.train checkpoint ({FORMAT}): it has {found}")
    missing = [k for k in require if k not in state]
    if missing:
        raise CheckpointError(f"{what} {path!r} lacks {missing}")
    if "model" in state:
        _check_state_dict(state["model"], path, what, "model")
    return state


def load_backbone_weights(module, path):
    """Loads a state_dict saved at path into module (strict=False: a ResNet body drops fc, a norm swap
    drops BN buffers) and reports what did not match; raises when no parameter matched at all."""
    sd = load_tensors(path, "backbone weights")
    _check_state_dict(sd, path, "backbone weights", "the file")
    own = module.state_dict()
    matched = [k for k in sd if k in own]
    if not any(k in sd for k, _ in module.named_parameters()):
        raise CheckpointError(f"backbone weights {path!r} match none of the {type(module).__name__}'s parameters "
                              f"(file keys like {sorted(sd)[:3]}, expected keys like {list(own)[:3]})")
    try:
        result = module.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise CheckpointError(f"backbone weights {path!r} do not fit: {e}") from None
    if result.missing_keys or result.unexpected_keys:
        warnings.warn(f"backbone weights {path!r}: {len(matched)} entries loaded; "
                      f"{len(result.missing_keys)} missing (left as initialised): {result.missing_keys[:10]}; "
                      f"{len(result.unexpected_keys)} unexpected (ignored): {result.unexpected_keys[:10]}",
                      stacklevel=2)
    return result


# Only for upgrade_legacy: a checkpoint written before FORMAT holds numpy's RNG state as an ndarray.
# numpy's array reconstruction builds arrays and dtypes, it calls nothing else (torch's documented remedy).
try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy 1
    from numpy.core.multiarray import _reconstruct
_NUMPY_ARRAY_GLOBALS = [(np.ndarray, "numpy.ndarray"), (np.dtype, "numpy.dtype")] + [
    (_reconstruct, f"{module}.multiarray._reconstruct") for module in ("numpy._core", "numpy.core")] + [
    type(np.dtype(np.uint32))]  # the keys' dtype class (numpy.dtypes.UInt32DType)


def upgrade_legacy(src, dst=None):
    """Rewrites a model.train checkpoint of the older layout (Python/numpy RNG states as objects, no
    "format") in this one, at dst (default: in place). Still a weights-only load: on top of tensors and
    plain data it allows numpy's array reconstruction, nothing else. Returns dst, or None when src is
    already in this layout (then nothing is written)."""
    dst = dst or src
    with torch.serialization.safe_globals(_NUMPY_ARRAY_GLOBALS):
        state = load_tensors(src, "legacy checkpoint")
    if isinstance(state, dict) and state.get("format") == FORMAT:
        return None
    if not isinstance(state, dict) or "format" in state or any(k not in state for k in TRAINING_KEYS):
        raise CheckpointError(f"legacy checkpoint {os.fspath(src)!r} is not an older model.train checkpoint "
                              f"(a dict with {list(TRAINING_KEYS)} and no 'format')")
    _check_state_dict(state["model"], src, "legacy checkpoint", "model")
    rngs = []
    for old in state["rng"]:
        (version, mt, gauss_next), (kind, keys, pos, has_gauss, cached) = old["python"], old["numpy"]
        if not (isinstance(keys, np.ndarray) and keys.dtype == np.uint32 and keys.shape == (624,)):
            raise CheckpointError(f"legacy checkpoint {os.fspath(src)!r}: numpy RNG state is not MT19937 keys")
        new = {"python": {"version": int(version), "state": torch.tensor(mt, dtype=torch.int64),
                          "gauss_next": gauss_next},
               "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                         "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
               "torch": old["torch"]}
        if "cuda" in old:
            new["cuda"] = old["cuda"]
        rngs.append(new)
    state.update(format=FORMAT, rng=rngs, config=json.loads(json.dumps(state.get("config"))))
    save_atomic(state, dst)
    return dst


def weights_digest(module):
    """sha256 of every parameter and buffer, in state_dict order (equal digests = equal weights)."""
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(description="python -m model.engine.checkpoint upgrade OLD [NEW]: rewrites a "
                                "checkpoint of the older layout (numpy RNG states) as tensors and plain data")
    p.add_argument("command", choices=["upgrade"])
    p.add_argument("src")
    p.add_argument("dst", nargs="?", help="default: rewrite src in place")
    args = p.parse_args(argv)
    try:
        written = upgrade_legacy(args.src, args.dst)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if written is None:
        print(f"{args.src} is already a current model.train checkpoint ({FORMAT}): nothing to upgrade, "
              f"nothing written")
    else:
        print(written)


if __name__ == "__main__":
    main()
