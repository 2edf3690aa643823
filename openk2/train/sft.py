"""`openk2 sft`: supervised fine-tuning on chat data (K2 chat format, tool calls included).

The data side is the part specific to SFT; the optimizer step is pre-training's (`Trainer`, MuonClip
as in K2's post-training) and the run around it -- directory, resume, logs, checkpoints, signals --
is the one run driver (`openk2.train.run.Run`). `SFTConfig` composes the shared option sets.

* Encoding: `encode_chat` renders each conversation (tools declared in the `tool_declare` system turn)
  and returns the assistant mask; the loss counts only tokens the assistant produced: its text, its
  tool-call sections and its closing <|im_end|>. User, system and tool-result tokens are context only.
* Packing: conversations are shifted (inputs = ids[:-1], targets = ids[1:]) *before* packing, so no
  target crosses into the next conversation; rows are filled first-fit-decreasing up to seq_len, and
  each conversation gets its own segment id, so the model attends within it only and its positions
  restart at 0 (`Transformer.forward(segment_ids=...)`). Padding is its own segment, masked out.
* Conversations longer than seq_len are dropped and counted, never truncated: a cut conversation
  would teach the model to stop mid tool call.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from openk2.checkpoint import load_model
from openk2.train.config import ConfigError, OptimizerOptions, RunOptions
from openk2.train.data import Batch
from openk2.train.memory import MemoryOptions


@dataclass
class Packed:
    input_ids: torch.Tensor  # (N, S)
    targets: torch.Tensor
    loss_mask: torch.Tensor  # bool
    segment_ids: torch.Tensor
    conversations: int
    dropped: int  # longer than seq_len
    assistant_tokens: int


def load_conversations(path: str | Path) -> list[dict]:
    """Chat JSONL: one {"messages": [...], "tools": [...]?} per line (what `openk2 synth trajectories`
    writes; OpenAI-shaped messages)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SFT data {path} does not exist")
    convs = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if line.strip():
            try:
                convs.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
    for i, c in enumerate(convs):
        msgs = c.get("messages") if isinstance(c, dict) else None
        if not isinstance(msgs, list) or not msgs:
            raise ValueError(f"{path}:{i + 1}: each line needs a non-empty 'messages' list")
        if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in msgs):
            raise ValueError(f"{path}:{i + 1}: no assistant message, nothing to train on")
    if not convs:
        raise ValueError(f"{path}: no conversations")
    return convs


def encode_conversation(tokenizer, conv: dict) -> tuple[list[int], list[int], list[bool]]:
    """(inputs, targets, mask): next-token pairs of one conversation; mask[t] says targets[t] is an
    assistant token."""
    from openk2.tokenizer.chat import encode_chat

    enc = encode_chat(tokenizer, conv["messages"], conv.get("tools") or None)
    return enc.ids[:-1], enc.ids[1:], enc.assistant_mask[1:]


def pack(examples: list[tuple[list[int], list[int], list[bool]]], seq_len: int, pad_id: int = 0) -> Packed:
    """First-fit-decreasing packing of shifted conversations into rows of seq_len tokens."""
    keep = [e for e in examples if 0 < len(e[0]) <= seq_len]
    dropped = len(examples) - len(keep)
    rows: list[list[int]] = []  # example indices per row
    free: list[int] = []
    for i in sorted(range(len(keep)), key=lambda i: -len(keep[i][0])):
        n = len(keep[i][0])
        slot = next((r for r, f in enumerate(free) if f >= n), None)
        if slot is None:
            rows.append([])
            free.append(seq_len)
            slot = len(rows) - 1
        rows[slot].append(i)
        free[slot] -= n
    shape = (len(rows), seq_len)
    inputs = torch.full(shape, pad_id, dtype=torch.long)
    targets = torch.full(shape, pad_id, dtype=torch.long)
    mask = torch.zeros(shape, dtype=torch.bool)
    segments = torch.zeros(shape, dtype=torch.long)
    for r, members in enumerate(rows):
        pos = 0
        for seg, i in enumerate(members):
            x, y, m = keep[i]
            n = len(x)
            inputs[r, pos : pos + n] = torch.tensor(x)
            targets[r, pos : pos + n] = torch.tensor(y)
            mask[r, pos : pos + n] = torch.tensor(m)
            segments[r, pos : pos + n] = seg
            pos += n
        segments[r, pos:] = len(members)  # padding: a segment of its own, never counted
    return Packed(inputs, targets, mask, segments, len(keep), dropped, int(mask.sum()))


class SFTLoader:
    """Shuffled batches of packed rows, epoch after epoch; its state resumes mid-epoch."""

    def __init__(self, packed: Packed, batch_size: int, seed: int = 0):
        if len(packed.input_ids) == 0:
            raise ValueError("no conversation fits seq_len; raise --seq-len")
        self.p, self.batch_size, self.seed = packed, min(batch_size, len(packed.input_ids)), seed
        self.epoch, self.pos = 0, 0
        self._order = self._perm()

    def _perm(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(len(self.p.input_ids), generator=g).tolist()

    def next(self) -> Batch:
        if self.pos + self.batch_size > len(self._order):
            self.epoch, self.pos = self.epoch + 1, 0
            self._order = self._perm()
        idx = self._order[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        p = self.p
        return Batch(p.input_ids[idx], p.targets[idx], p.loss_mask[idx], p.segment_ids[idx])

    def batches(self, n: int) -> list[Batch]:
        return [self.next() for _ in range(n)]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.epoch = state["seed"], state["epoch"]
        self._order = self._perm()
        self.pos = state["pos"]


@dataclass(kw_only=True)
class SFTConfig(OptimizerOptions, RunOptions):
    """`openk2 sft`: the shared run and optimizer options with SFT's defaults, plus its data."""

    data: str
    init: str  # checkpoint (or run directory) to fine-tune
    out_dir: str | None = "runs/sft"
    steps: int = 100
    batch_size: int = 8
    seq_len: int = 1024
    grad_accum: int = 1
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_steps: int = 10
    decay_fraction: float = 0.3
    val_fraction: float = 0.05
    eval_every: int = 25
    save_every: int = 50
    memory: MemoryOptions = field(default_factory=MemoryOptions)

    def validate(self) -> SFTConfig:
        self.validate_run()
        self.validate_optimizer()
        for name in ("batch_size", "seq_len", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        return self


def sft(cfg: SFTConfig, resume: bool = True, overwrite: bool = False) -> dict:
    """Fine-tune `cfg.init` on `cfg.data`; resumes the run in out_dir when it has a checkpoint."""
    from openk2.checkpoint import load_tokenizer, resolve_checkpoint
    from openk2.checkpoint.hf import load_weights_
    from openk2.checkpoint.store import rng_state, set_rng_state
    from openk2.config import ModelConfig
    from openk2.train.logging import ConsoleLog, plot_run, read_metrics
    from openk2.train.loop import Trainer, build_optimizer, pick_device
    from openk2.train.run import Run
    from openk2.train.schedule import Schedule

    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    init = resolve_checkpoint(cfg.init)
    convs = load_conversations(cfg.data)
    model_config = ModelConfig.from_pretrained(init)
    run = Run(
        cfg, job="sft", config=asdict(cfg), model_config=model_config, resume=resume, overwrite=overwrite
    )
    state = run.open()
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(init, model_config.vocab_size)
    model = load_model(init).to(device)
    if model.config.torch_dtype == "bfloat16" and device.type == "cpu":
        model = model.float()

    rng = random.Random(cfg.seed)
    order = list(range(len(convs)))
    rng.shuffle(order)
    n_val = int(len(convs) * cfg.val_fraction)
    encode = lambda ids: [encode_conversation(tokenizer, convs[i]) for i in ids]  # noqa: E731
    packed = pack(encode(order[n_val:]), cfg.seq_len)
    val = pack(encode(order[:n_val]), cfg.seq_len) if n_val else None
    dropped = packed.dropped + (val.dropped if val else 0)
    if dropped:
        print(
            f"warning: {dropped} of {len(convs)} conversations are longer than --seq-len {cfg.seq_len} "
            "tokens and are left out (never truncated); raise --seq-len to keep them",
            file=sys.stderr,
        )
    loader = SFTLoader(packed, cfg.batch_size, cfg.seed)
    eval_batches = (
        [Batch(val.input_ids[i : i + cfg.batch_size], val.targets[i : i + cfg.batch_size],
               val.loss_mask[i : i + cfg.batch_size], val.segment_ids[i : i + cfg.batch_size])
         for i in range(0, len(val.input_ids), cfg.batch_size)]
        if val is not None and len(val.input_ids) else []
    )  # fmt: skip

    optimizer = build_optimizer(model, cfg)
    warmup = min(cfg.warmup_steps, cfg.steps)
    schedule = Schedule(cfg.schedule, cfg.steps, warmup, cfg.decay_fraction, cfg.min_lr_ratio)
    trainer = Trainer(model, optimizer, schedule, cfg, device)
    if state is not None:
        load_weights_(model, run.checkpoint)
        trainer.load_state_dict(state)
        loader.load_state_dict(state["data"])
        set_rng_state(state["rng"])
    data_stats = {
        "conversations": packed.conversations,
        "dropped_too_long": dropped,
        "rows": len(packed.input_ids),
        "assistant_tokens": packed.assistant_tokens,
        "fill": float(
            (packed.segment_ids != packed.segment_ids.max(dim=1, keepdim=True).values).float().mean()
        ),
        "val_conversations": val.conversations if val else 0,
    }
    start = f"resuming at step {trainer.step}" if state is not None else f"new run {run.run_id}"
    print(
        f"sft {init} on {cfg.data}: {packed.conversations} training conversations in "
        f"{data_stats['rows']} rows of {cfg.seq_len} tokens ({data_stats['fill']:.0%} filled), "
        f"{data_stats['val_conversations']} held out; {cfg.steps} steps on {device}",
        f"output {run.dir} ({start})",
        sep="\n",
        flush=True,
    )
    if state is None:
        run.log({"kind": "config", "sft": asdict(cfg), "model": model.config.to_hf_dict(), "data": data_stats,
                 "run_id": run.run_id})  # fmt: skip

    def save() -> Path:
        return trainer.save(run, tokenizer, {"data": loader.state_dict(), "rng": rng_state()})

    def evaluate(step: int) -> dict | None:
        if not eval_batches:
            return None
        return {
            "kind": "eval",
            "step": step,
            "tokens": trainer.tokens,
            "loss": trainer.evaluate(eval_batches),
        }

    def step() -> dict:
        record = trainer.train_step(loader.batches(cfg.grad_accum))
        record["epoch"] = loader.epoch
        return record

    first_eval = None
    if eval_batches and trainer.step == 0:
        first_eval = trainer.evaluate(eval_batches)
        run.log({"kind": "eval", "step": 0, "tokens": 0, "loss": first_eval})
    console = ConsoleLog(cfg.steps, cfg.log_every, start_tokens=trainer.tokens)
    result = run.loop(step, start_step=trainer.step, last_step=cfg.steps, save_fn=save, eval_fn=evaluate,
                      console=console, desc="sft")  # fmt: skip
    metrics = read_metrics(run.dir)
    evals = [m for m in metrics if m.get("kind") == "eval"]
    curves = plot_run(metrics, run.dir / "curves.png", title=f"SFT of {init} on {Path(cfg.data).name}")
    return {
        "checkpoint": str(result.last_saved) if result.last_saved else None,
        "curves": str(curves),
        "steps": trainer.step,
        "train_loss": result.record["loss"] if result.record else None,
        "eval_loss_before": first_eval
        if first_eval is not None
        else next((m["loss"] for m in evals if m["step"] == 0), None),
        "eval_loss_after": evals[-1]["loss"] if evals and evals[-1]["step"] > 0 else None,
        "seconds": result.seconds,
        "interrupted": result.interrupted,
        **data_stats,
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", help="chat JSONL ({'messages': [...], 'tools': [...]} per line)")
    p.add_argument("--init", required=True, help="checkpoint or run directory to start from")
    d = SFTConfig(data="", init="")
    for name in ("out_dir", "steps", "batch_size", "seq_len", "grad_accum", "lr", "weight_decay",
                 "warmup_steps", "val_fraction", "eval_every", "save_every", "log_every", "seed",
                 "device"):  # fmt: skip
        value = getattr(d, name)
        p.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    p.add_argument("--optimizer", choices=["muonclip", "muon", "adamw"], default=d.optimizer)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-resume", action="store_true", help="start a new run instead of resuming out_dir's")
    p.add_argument("--overwrite", action="store_true", help="with --no-resume: move the old run aside")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines still print)")


def run(args: argparse.Namespace) -> int:
    from openk2.train.run import run_command, signal_exit_code

    names = {f.name for f in fields(SFTConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    summary = run_command(
        lambda: sft(SFTConfig(**values, progress=not args.no_progress), not args.no_resume, args.overwrite)
    )
    if isinstance(summary, int):
        return summary
    if summary["interrupted"]:
        where = f"step {summary['steps']}; checkpoint {summary['checkpoint']}"
        print(
            f"{summary['interrupted']}: stopped at {where}; run the same command to resume", file=sys.stderr
        )
        return signal_exit_code(summary["interrupted"])
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    print(
        f"fine-tuned {summary['steps']} steps in {summary['seconds']:.0f} s on {summary['conversations']} "
        f"conversations ({summary['assistant_tokens']:,} assistant tokens, {summary['dropped_too_long']} "
        f"left out as too long); held-out loss {fmt(summary['eval_loss_before'])} -> "
        f"{fmt(summary['eval_loss_after'])}"
    )
    print(f"checkpoint: {summary['checkpoint']}\ncurves:     {summary['curves']}")
    return 0
