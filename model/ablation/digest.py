"""The config digest: a results file's runs count only for the resolved config they were recorded with.
Committed results files name digests (in their protocol line), so this function must not change."""
import hashlib
import json


def _without_nulls(value):
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    return value


def config_digest(cfg):
    """Short hash of a resolved config less what differs between runs (seed, output folder): a results
    file recorded under another model, data or schedule is not carried over, even from the same file.
    Keys set to null are left out: a new config key's null default means "as before it existed" (the
    rule of model/config.py), so adding one does not orphan results recorded before it."""
    shared = {k: v for k, v in cfg.items() if k not in ("seed", "output_dir")}
    return hashlib.sha256(json.dumps(_without_nulls(shared), sort_keys=True).encode()).hexdigest()[:12]
