"""Run logs: one JSON object per line (metrics.jsonl), TensorBoard scalars, and a PNG of the curves.

JSONL is the source of truth (plots and docs read it); TensorBoard is for watching a run live.
"""

from __future__ import annotations

import json
import math
import os
import time
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


# GPU peak dense bf16 matmul throughput in TFLOP/s, by a substring of the device name (MFU's
# denominator). A CPU's peak is not knowable from here: set OPENK2_PEAK_TFLOPS to get MFU there.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "4090": 165.0}


def peak_tflops(device) -> float | None:
    """The device's peak TFLOP/s for MFU: $OPENK2_PEAK_TFLOPS, or the table above for a GPU."""
    if os.environ.get("OPENK2_PEAK_TFLOPS"):
        return float(os.environ["OPENK2_PEAK_TFLOPS"])
    if getattr(device, "type", str(device)) == "cuda":
        import torch

        name = torch.cuda.get_device_name(device)
        return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    return None


def train_flops_per_token(config, seq_len: int, activated_params: int) -> float:
    """Forward + backward FLOPs per token: 6 per activated matmul weight (embedding lookups are not
    matmuls) plus causal attention's scores and weighted sum (half of the seq_len x seq_len)."""
    lookup = config.vocab_size * config.hidden_size
    matmul = 6 * (activated_params - lookup)
    heads, layers = config.num_attention_heads, config.num_hidden_layers
    attention = 6 * layers * heads * (config.qk_head_dim + config.v_head_dim) * seq_len / 2
    return float(matmul + attention)


class ConsoleLog:
    """Plain log lines for the console, one every `every` steps (and after the first): the loss
    averaged over the steps since the last line, tokens/s and TFLOP/s over that wall time, MFU when
    the peak is known, the learning rate and the ETA. Printed whether or not stdout is a terminal."""

    def __init__(
        self,
        last_step: int,
        every: int,
        flops_per_token: float = 0.0,
        peak: float | None = None,
        start_tokens: int = 0,
    ):
        self.last_step, self.every, self.flops, self.peak = last_step, every, flops_per_token, peak
        self.window: list[dict] = []
        self.t_last = time.perf_counter()
        self.tokens_last = start_tokens
        self.lines = 0

    def update(self, record: dict, eval_record: dict | None = None) -> str | None:
        self.window.append(record)
        step = record["step"]
        if self.lines and step % self.every and step != self.last_step and eval_record is None:
            return None
        now = time.perf_counter()
        seconds = max(now - self.t_last, 1e-9)
        losses = [r["loss"] for r in self.window if "loss" in r]
        tokens = record["tokens"] - self.tokens_last if "tokens" in record else 0
        per_step = seconds / len(self.window)
        parts = [f"step {step}/{self.last_step}"]
        if losses:
            parts.append(f"loss {sum(losses) / len(losses):.4f}")
        if eval_record is not None and "loss" in eval_record:
            parts.append(f"eval {eval_record['loss']:.4f}")
        if tokens:
            rate = tokens / seconds
            parts.append(f"{rate:,.0f} tok/s")
            if self.flops:
                achieved = rate * self.flops / 1e12
                parts.append(f"{achieved:.3g} TFLOP/s" if achieved >= 1 else f"{achieved * 1e3:.3g} GFLOP/s")
                if self.peak:
                    parts.append(f"MFU {100 * achieved / self.peak:.1f}%")
        if "lr" in record:
            parts.append(f"lr {record['lr']:.2e}")
        parts.append(f"{per_step:.2f} s/step, ETA {eta_text(per_step * (self.last_step - step))}")
        self.window, self.t_last, self.tokens_last = [], now, record.get("tokens", 0)
        self.lines += 1
        return "  ".join(parts)


def eta_text(seconds: float) -> str:
    """12s, 3m05s, 2h10m."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
