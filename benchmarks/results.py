"""The numbers of one benchmark run, with the look-ups the report, the targets and the plots need.

The JSON written by run.py is `Results.to_json()`; `Results.from_json` reads it back (for re-plotting).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from .targets import BYTE_FLOOR_PASSES

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_json(data, path: str, indent: int = 1) -> str:
    """Writes a results file and says so ("wrote <path>", the line tools/gpu_check.py looks for)."""
    with open(path, "w") as f:
        json.dump(data, f, indent=indent)
    print(f"wrote {os.path.relpath(path, REPO_ROOT)}", flush=True)
    return path


STAGES = ("plan", "loss_fwd", "loss_fwd_bwd", "pipeline_fwd_bwd")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Results:
    meta: dict  # device, versions, commit, settings
    copy_bandwidth: float | None  # bytes/s of a large copy_ on the device
    records: list = field(default_factory=list)  # one dict per (impl, stage, N, C, dtype)
    model_step: dict | None = None

    @property
    def device_type(self) -> str:
        return self.meta["device"]["type"]

    def add(self, impl, stage, n, c, h, w, dtype, measurement_json: dict, note: str | None = None):
        record = {"impl": impl, "stage": stage, "N": n, "C": c, "H": h, "W": w, "dtype": dtype}
        record.update(measurement_json)
        if note:
            record["note"] = note
        if impl != "per_roi" and stage == "loss_fwd_bwd":
            record["bandwidth_GBps"] = self._bytes_floor(n, c, h, w, dtype) / (record["median_ms"] / 1e3) / 1e9
        self.records.append(record)

    @staticmethod
    def element_size(dtype: str) -> int:
        return torch.empty((), dtype=DTYPES[dtype]).element_size()

    def _bytes_floor(self, n, c, h, w, dtype) -> int:
        return BYTE_FLOOR_PASSES * n * c * h * w * self.element_size(dtype)

    def find(self, impl, stage, n, c, dtype):
        for record in self.records:
            if (record["impl"], record["stage"], record["N"], record["C"], record["dtype"]) == (
                    impl, stage, n, c, dtype):
                return record
        return None

    def time(self, impl, stage, n, c, dtype):
        """Median seconds, or None if not measured."""
        record = self.find(impl, stage, n, c, dtype)
        return None if record is None else record["median_ms"] / 1e3

    def peak(self, impl, stage, n, c, dtype):
        record = self.find(impl, stage, n, c, dtype)
        return None if record is None else record.get("peak_extra_bytes")

    def fused_bandwidth(self, n, c, dtype):
        """Achieved bytes/s of the fused loss fwd+bwd over its 5|z| floor."""
        record = self.find("fused", "loss_fwd_bwd", n, c, dtype)
        return None if record is None else record["bandwidth_GBps"] * 1e9

    def model_step_share(self):
        if not self.model_step or self.model_step.get("loss_share") is None:
            return None
        return self.model_step["loss_share"]

    def shapes(self):
        """Sorted distinct (N, C, dtype) measured."""
        return sorted({(r["N"], r["C"], r["dtype"]) for r in self.records},
                      key=lambda s: (s[2] != "float32", s[1], s[0]))

    def to_json(self) -> dict:
        return {"meta": self.meta, "copy_bandwidth_GBps": (self.copy_bandwidth or 0) / 1e9,
                "records": self.records, "model_step": self.model_step}

    @classmethod
    def from_json(cls, data: dict) -> "Results":
        return cls(meta=data["meta"], copy_bandwidth=data["copy_bandwidth_GBps"] * 1e9, records=data["records"],
                   model_step=data.get("model_step"))

    @classmethod
    def load(cls, path) -> "Results":
        with open(path) as f:
            return cls.from_json(json.load(f))
