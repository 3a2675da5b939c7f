"""Metrics to JSONL and TensorBoard event files (tensorboardX: no TensorFlow), and a readable
log of sample traces. Resuming truncates records past the resumed step, so a restarted run never
writes a step twice."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping

import numpy as np


def _scalar(v) -> float | None:
    try:
        x = float(np.asarray(v))
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


class MetricsWriter:
    """write(step, metrics) appends one JSON line and TensorBoard scalars; samples(step, text)
    appends to `samples.log`. Only process 0 should construct one."""

    def __init__(self, logdir: str | os.PathLike, resume_step: int | None = None, tb: bool = True):
        self.logdir = os.fspath(logdir)
        os.makedirs(self.logdir, exist_ok=True)
        self.path = os.path.join(self.logdir, "metrics.jsonl")
        if resume_step is not None:
            self._truncate(resume_step)
        elif os.path.exists(self.path):
            os.remove(self.path)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
        self._tb = None
        if tb:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(self.logdir, "tb"), purge_step=resume_step)

    def _truncate(self, step: int):
        if not os.path.exists(self.path):
            return
        with open(self.path, encoding="utf-8") as f:
            keep = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        with open(self.path, "w", encoding="utf-8") as f:
            f.writelines(keep)

    def write(self, step: int, metrics: Mapping[str, object]):
        record = {"step": int(step)}
        for k, v in metrics.items():
            record[k] = _scalar(v)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and v is not None:
                    self._tb.add_scalar(k, v, int(step))

    def samples(self, step: int, text: str):
        with open(os.path.join(self.logdir, "samples.log"), "a", encoding="utf-8") as f:
            f.write(f"===== step {int(step)} =====\n{text}\n")
        if self._tb is not None:
            self._tb.add_text("samples", text, int(step))

    def close(self):
        """Flush and close (safe to call twice)."""
        self._file.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(logdir: str | os.PathLike) -> list[dict]:
    with open(os.path.join(os.fspath(logdir), "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
