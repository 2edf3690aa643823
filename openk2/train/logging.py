"""Run logs: one JSON object per line (metrics.jsonl), TensorBoard scalars, and a PNG of the curves.

JSONL is the source of truth (plots and docs read it); TensorBoard is for watching a run live.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


class RunLogger:
    def __init__(self, run_dir: str | os.PathLike, tensorboard: bool = True, append: bool = False):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        self._file = open(self.path, "a" if append else "w")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
            except ImportError:  # tensorboard is a dependency, but a missing one should not stop training
                self._tb = None

    def log(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None and "step" in record:
            kind = record.get("kind", "train")
            for k, v in record.items():
                if k not in ("step", "kind") and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(f"{kind}/{k}", v, record["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_run(metrics: list[dict], out: str | os.PathLike, title: str = "") -> Path:
    """Train/eval loss, max attention logit and expert-load imbalance against tokens seen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [m for m in metrics if m.get("kind") == "train"]
    evals = [m for m in metrics if m.get("kind") == "eval"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    axes[0].plot([m["tokens"] for m in train], [m["loss"] for m in train], label="train", lw=1)
    if evals:
        axes[0].plot([m["tokens"] for m in evals], [m["loss"] for m in evals], "o-", label="eval")
    axes[0].set(xlabel="tokens", ylabel="loss", title="loss")
    axes[0].legend()
    if train and "max_logit" in train[0]:
        axes[1].plot([m["tokens"] for m in train], [m["max_logit"] for m in train], lw=1)
    axes[1].set(xlabel="tokens", ylabel="max attention logit", title="max logit (all heads)")
    if train and "imbalance" in train[0]:
        axes[2].plot([m["tokens"] for m in train], [m["imbalance"] for m in train], lw=1)
    axes[2].set(xlabel="tokens", ylabel="max / mean expert load", title="expert-load imbalance")
    from matplotlib.ticker import EngFormatter

    for ax in axes:  # 100k, 1M, ... instead of run-together raw token counts
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)
