"""`openk2 sft`: supervised fine-tuning on chat data (K2 chat format, tool calls included).

The data side is the part specific to SFT; the optimizer step, schedule, checkpoints and logs are the
pre-training machinery (`openk2.train.loop.Trainer`, `save_checkpoint`, `RunLogger`), so SFT runs with
MuonClip like K2's post-training did.

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
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from openk2.checkpoint import load_model
from openk2.train.data import Batch


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
    from openk2.client import read_jsonl

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SFT data {path} does not exist")
    convs = read_jsonl(path)
    for i, c in enumerate(convs):
        msgs = c.get("messages")
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


@dataclass
class SFTConfig:
    data: str
    init: str  # checkpoint (or run directory) to fine-tune
    out_dir: str = "runs/sft"
    steps: int = 100
    batch_size: int = 8
    seq_len: int = 1024
    grad_accum: int = 1
    optimizer: str = "muonclip"
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_steps: int = 10
    schedule: str = "wsd"
    decay_fraction: float = 0.3
    min_lr_ratio: float = 0.1
    val_fraction: float = 0.05
    eval_every: int = 25
    save_every: int = 50
    keep_checkpoints: int = 2
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    progress: bool = True
    tensorboard: bool = True


def sft(cfg: SFTConfig, resume: bool = True) -> dict:
    """Fine-tune `cfg.init` on `cfg.data`; resumes from the newest checkpoint in out_dir."""
    from tqdm import tqdm

    from openk2.checkpoint.hf import load_weights_
    from openk2.checkpoint.store import (
        latest_checkpoint,
        load_trainer_state,
        resolve_checkpoint,
        rng_state,
        save_checkpoint,
        set_rng_state,
    )
    from openk2.tokenizer.tokenizer import K2Tokenizer
    from openk2.train.logging import RunLogger
    from openk2.train.loop import TrainConfig, Trainer, TrainingDiverged, build_optimizer, pick_device
    from openk2.train.schedule import Schedule

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tcfg = TrainConfig(
        steps=cfg.steps, batch_size=cfg.batch_size, seq_len=cfg.seq_len, grad_accum=cfg.grad_accum,
        optimizer=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay, schedule=cfg.schedule,
        warmup_steps=min(cfg.warmup_steps, cfg.steps), decay_fraction=cfg.decay_fraction,
        min_lr_ratio=cfg.min_lr_ratio, seed=cfg.seed, out_dir=cfg.out_dir,
    ).validate()  # fmt: skip
    device = pick_device(cfg.device)
    run_dir = Path(cfg.out_dir)
    ckpt = latest_checkpoint(run_dir) if resume and run_dir.exists() else None
    init = resolve_checkpoint(cfg.init)
    torch.manual_seed(cfg.seed)
    tokenizer = K2Tokenizer.from_pretrained(init)
    model = load_model(ckpt or init).to(device)
    if model.config.torch_dtype == "bfloat16" and device.type == "cpu":
        model = model.float()

    convs = load_conversations(cfg.data)
    rng = random.Random(cfg.seed)
    order = list(range(len(convs)))
    rng.shuffle(order)
    n_val = int(len(convs) * cfg.val_fraction)
    encode = lambda ids: [encode_conversation(tokenizer, convs[i]) for i in ids]  # noqa: E731
    packed = pack(encode(order[n_val:]), cfg.seq_len)
    val = pack(encode(order[:n_val]), cfg.seq_len) if n_val else None
    loader = SFTLoader(packed, cfg.batch_size, cfg.seed)
    eval_batches = (
        [Batch(val.input_ids[i : i + cfg.batch_size], val.targets[i : i + cfg.batch_size],
               val.loss_mask[i : i + cfg.batch_size], val.segment_ids[i : i + cfg.batch_size])
         for i in range(0, len(val.input_ids), cfg.batch_size)]
        if val is not None and len(val.input_ids) else []
    )  # fmt: skip

    optimizer = build_optimizer(model, tcfg)
    schedule = Schedule(cfg.schedule, cfg.steps, tcfg.warmup_steps, cfg.decay_fraction, cfg.min_lr_ratio)
    trainer = Trainer(model, optimizer, schedule, tcfg, device)
    if ckpt is not None:
        state = load_trainer_state(ckpt)
        load_weights_(model, ckpt)
        trainer.load_state_dict(state)
        loader.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        print(f"resuming SFT from {ckpt} (step {trainer.step})")
    logger = RunLogger(run_dir, tensorboard=cfg.tensorboard, append=ckpt is not None)
    data_stats = {
        "conversations": packed.conversations,
        "dropped_too_long": packed.dropped + (val.dropped if val else 0),
        "rows": len(packed.input_ids),
        "assistant_tokens": packed.assistant_tokens,
        "fill": float(
            (packed.segment_ids != packed.segment_ids.max(dim=1, keepdim=True).values).float().mean()
        ),
        "val_conversations": val.conversations if val else 0,
    }
    if ckpt is None:
        logger.log(
            {"kind": "config", "sft": asdict(cfg), "model": model.config.to_hf_dict(), "data": data_stats}
        )

    def save() -> Path:
        state = trainer.state_dict()
        state.update(data=loader.state_dict(), rng=rng_state(), config={"sft": asdict(cfg)})
        return save_checkpoint(run_dir, trainer.step, model, tokenizer, state, keep=cfg.keep_checkpoints)

    bar = tqdm(total=cfg.steps, initial=trainer.step, disable=not cfg.progress, desc="sft", unit="step")
    last_saved, record, t0, first_eval, last_eval = ckpt, None, time.perf_counter(), None, None
    if eval_batches and trainer.step == 0:
        first_eval = trainer.evaluate(eval_batches)
        logger.log({"kind": "eval", "step": 0, "tokens": 0, "loss": first_eval})
    try:
        while trainer.step < cfg.steps:
            try:
                record = trainer.train_step(loader.batches(cfg.grad_accum))
            except TrainingDiverged as e:
                raise TrainingDiverged(f"{e}; last good checkpoint: {last_saved}") from None
            record["epoch"] = loader.epoch
            logger.log(record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}", epoch=loader.epoch)
            s = trainer.step
            if eval_batches and (s % cfg.eval_every == 0 or s == cfg.steps):
                last_eval = trainer.evaluate(eval_batches)
                logger.log({"kind": "eval", "step": s, "tokens": trainer.tokens, "loss": last_eval})
            if s % cfg.save_every == 0 or s == cfg.steps:
                last_saved = save()
    finally:
        bar.close()
        logger.close()
    return {
        "checkpoint": str(last_saved) if last_saved else None,
        "steps": trainer.step,
        "train_loss": record["loss"] if record else None,
        "eval_loss_before": first_eval,
        "eval_loss_after": last_eval,
        "seconds": time.perf_counter() - t0,
        **data_stats,
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", help="chat JSONL ({'messages': [...], 'tools': [...]} per line)")
    p.add_argument("--init", required=True, help="checkpoint or run directory to start from")
    d = SFTConfig(data="", init="")
    for name in ("out_dir", "steps", "batch_size", "seq_len", "grad_accum", "lr", "weight_decay",
                 "warmup_steps", "val_fraction", "eval_every", "save_every", "seed", "device"):  # fmt: skip
        value = getattr(d, name)
        p.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    p.add_argument("--optimizer", choices=["muonclip", "muon", "adamw"], default=d.optimizer)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-resume", action="store_true", help="start over even if out_dir has checkpoints")


def run(args: argparse.Namespace) -> int:
    fields = {k: v for k, v in vars(args).items() if k in SFTConfig.__dataclass_fields__}
    cfg = SFTConfig(**fields)
    try:
        summary = sft(cfg, resume=not args.no_resume)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    print(json.dumps(summary, indent=2))
    return 0
