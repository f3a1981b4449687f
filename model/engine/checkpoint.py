"""Checkpoints written atomically (temporary file, then os.replace), with every RNG state, so that
--resume continues exactly where the run stopped."""
import hashlib
import os
import random

import numpy as np
import torch


def rng_state():
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_atomic(obj, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)  # readers see the old file or the new one, never half of one


def load(path, map_location="cpu"):
    # our own files hold RNG states (Python objects), so they are not weights-only
    return torch.load(path, map_location=map_location, weights_only=False)


def model_weights(path_or_checkpoint):
    ckpt = load(path_or_checkpoint) if isinstance(path_or_checkpoint, str) else path_or_checkpoint
    return ckpt["model"] if "model" in ckpt else ckpt


def weights_digest(module):
    """sha256 of every parameter and buffer, in state_dict order (equal digests = equal weights)."""
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
