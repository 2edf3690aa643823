"""The training loop, reusable by pre-training and SFT.

Pieces, each usable on its own:

* `causal_lm_loss(logits, targets, mask)`: mean next-token cross-entropy over the counted positions.
* `build_optimizer(model, cfg)`: MuonClip, plain Muon (no clip) or AdamW with the same decay split.
* `Trainer.train_step(micro_batches)`: one optimizer step over gradient-accumulated micro-batches:
  forward (bf16 autocast on GPU), loss (+ the sequence-wise aux loss), backward, gradient clipping,
  a finite-loss check *before* the update (a NaN never reaches the weights), the MuonClip step with
  QK-Clip from the max logits of all the step's micro-batches, then the routing-bias update from the
  step's expert counts.
* `Trainer.evaluate(batches)`, `Trainer.state_dict()` / `load_state_dict()` for checkpoints.
* `pretrain(cfg)`: the whole pre-training run behind `openk2 train`. Under torchrun (or with a
  parallel layout in `cfg.parallel`) it hands over to `openk2.distributed.train.pretrain_distributed`,
  which runs the same steps on a pp x dp x ep mesh and writes the same checkpoints.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from openk2.distributed.mesh import ParallelConfig
from openk2.optim import MuonClip, load_imbalance, update_routing_bias_
from openk2.optim.muon import split_parameters
from openk2.train.data import Batch
from openk2.train.memory import MemoryOptions, activation_context, apply_memory_options
from openk2.train.schedule import Schedule

OPTIMIZERS = ("muonclip", "muon", "adamw")
# Newton-Schulz precision: auto = bf16 as K2 where the hardware has bf16 units, else float32
# (optim.muon.resolve_ns_dtype); float32 for exact comparisons
NS_DTYPES = ("auto", "bfloat16", "float32")


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN/inf; the update was not applied."""


def check_finite(step: int, loss: float, grad_norm: float) -> None:
    """Raise TrainingDiverged for a NaN/inf loss or gradient norm, before the update is applied."""
    if not math.isfinite(loss) or not math.isfinite(grad_norm):
        raise TrainingDiverged(
            f"step {step}: loss {loss}, gradient norm {grad_norm}; the update was not applied"
        )


def train_record(
    *,
    step: int,
    tokens: int,
    loss: float,
    aux_loss: float,
    lr: float,
    grad_norm: float,
    max_logit: float,
    heads_clipped: int,
    imbalance: float,
    step_tokens: int,
    seconds: float,
) -> dict:
    """The metrics record of one optimizer step, as the logger, the plots and the tests read it
    (single-process and torchrun runs alike). tokens: seen so far; step_tokens: in this step."""
    return {
        "kind": "train",
        "step": step,
        "tokens": tokens,
        "loss": loss,
        "aux_loss": aux_loss,
        "lr": lr,
        "grad_norm": grad_norm,
        "max_logit": max_logit,
        "heads_clipped": heads_clipped,
        "imbalance": imbalance,
        "step_time": seconds,
        "tokens_per_s": step_tokens / seconds,
    }


def causal_lm_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None):
    """Mean cross-entropy of logits (B, S, V) against targets (B, S), over positions where mask is
    nonzero (all when None). Computed in float32 whatever the logits' dtype."""
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
    if mask is None:
        return loss.mean()
    mask = mask.flatten().to(loss.dtype)
    return (loss * mask).sum() / mask.sum().clamp_min(1.0)


@dataclass
class TrainConfig:
    # what to train, on what
    preset: str = "small"
    corpus: str = "shakespeare"
    tokenizer: str = "auto"  # auto (by the preset's vocab size), default, byte-level, or a directory
    out_dir: str = "runs/small"
    # how long and how big
    steps: int = 200
    batch_size: int = 16
    seq_len: int = 128
    grad_accum: int = 1
    # optimizer
    optimizer: str = "muonclip"
    lr: float = 1e-2
    weight_decay: float = 0.1
    momentum: float = 0.95
    qk_clip_tau: float = 100.0
    grad_clip: float = 1.0
    ns_dtype: str = "auto"
    bias_update_rate: float = 1e-3
    aux_loss_alpha: float | None = None  # None: the model config's
    # schedule
    schedule: str = "wsd"
    warmup_steps: int = 20
    decay_fraction: float = 0.2
    min_lr_ratio: float = 0.1
    # evaluation, checkpoints, data
    eval_every: int = 50
    eval_batches: int = 4
    save_every: int = 100
    keep_checkpoints: int = 2
    val_fraction: float = 0.02
    document_mask: bool = False
    max_chars: int | None = None
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    memory: MemoryOptions = field(default_factory=MemoryOptions)
    stop_at: int | None = None  # stop (as if killed) after this step, keeping the schedule of `steps`
    progress: bool = True
    tensorboard: bool = True
    # layout under torchrun; dp=0: world size / (pp * ep)
    parallel: ParallelConfig = field(default_factory=lambda: ParallelConfig(dp=0))

    def validate(self) -> TrainConfig:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.ns_dtype not in NS_DTYPES:
            raise ValueError(f"unknown ns_dtype {self.ns_dtype!r}; choose one of {', '.join(NS_DTYPES)}")
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_batches", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        Schedule(self.schedule, self.steps, min(self.warmup_steps, self.steps), self.decay_fraction)
        return self


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        split = split_parameters(model)
        params = [p for _, p in split.muon + split.adamw]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        groups = [dict(params=decay, weight_decay=cfg.weight_decay), dict(params=no_decay, weight_decay=0.0)]
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)
    tau = cfg.qk_clip_tau if cfg.optimizer == "muonclip" else None
    return MuonClip(model, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum, qk_clip_tau=tau,
                    ns_dtype=cfg.ns_dtype)  # fmt: skip


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Trainer:
    """Owns model, optimizer and schedule; counts steps and tokens."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        schedule: Schedule,
        cfg: TrainConfig,
        device: torch.device | None = None,
    ):
        self.model, self.optimizer, self.schedule, self.cfg = model, optimizer, schedule, cfg
        self.device = device or next(model.parameters()).device
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.step = 0
        self.tokens = 0
        self.model.record_stats(True)  # max logits (QK-Clip, logs) and the sequence aux loss
        if cfg.aux_loss_alpha is not None:
            for m in model.modules():
                if hasattr(m, "aux_loss_alpha"):
                    m.aux_loss_alpha = cfg.aux_loss_alpha
        apply_memory_options(model, cfg.memory)

    def autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def train_step(self, micro_batches: list[Batch]) -> dict:
        """One optimizer step; returns its metrics. Raises TrainingDiverged (weights untouched) on a
        non-finite loss or gradient norm."""
        t0 = time.perf_counter()
        self.model.train()
        scale = self.schedule(self.step)
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = base * scale
        self.optimizer.zero_grad(set_to_none=True)
        n = len(micro_batches)
        loss_sum, aux_sum, tokens = 0.0, 0.0, 0
        max_logits: dict[int, torch.Tensor] = {}
        counts: dict[int, torch.Tensor] = {}
        for mb in micro_batches:
            mb = mb.to(self.device)
            with activation_context(self.cfg.memory, self.device), self.autocast():
                logits = self.model(mb.input_ids, segment_ids=mb.segment_ids)
                loss = causal_lm_loss(logits, mb.targets, mb.loss_mask)
                aux = self.model.aux_loss().to(loss.device)
            ((loss + aux) / n).backward()
            loss_sum += loss.detach().float()
            aux_sum += float(aux.detach())
            tokens += mb.num_tokens
            for layer, m in self.model.max_attention_logits().items():
                max_logits[layer] = torch.maximum(max_logits[layer], m) if layer in max_logits else m
            for layer, c in self.model.expert_counts().items():
                counts[layer] = counts[layer] + c if layer in counts else c
        loss_value = float(loss_sum) / n
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip))
        check_finite(self.step + 1, loss_value, grad_norm)
        if isinstance(self.optimizer, MuonClip):
            clipped = self.optimizer.step(max_logits=max_logits)
        else:
            self.optimizer.step()
            clipped = 0
        for layer in max_logits:  # consumed above; do not leave stale numbers on the modules
            self.model.layers[str(layer)].self_attn.max_logits = None
        update_routing_bias_(self.model, counts, self.cfg.bias_update_rate)
        self.step += 1
        self.tokens += tokens
        return train_record(
            step=self.step,
            tokens=self.tokens,
            loss=loss_value,
            aux_loss=aux_sum / n,
            lr=self.base_lrs[0] * scale,
            grad_norm=grad_norm,
            max_logit=max(float(m.max()) for m in max_logits.values()) if max_logits else float("nan"),
            heads_clipped=clipped,
            imbalance=load_imbalance(counts),
            step_tokens=tokens,
            seconds=time.perf_counter() - t0,
        )

    @torch.no_grad()
    def evaluate(self, batches: list[Batch]) -> float:
        self.model.eval()
        self.model.record_stats(False)  # the fast attention path; eval logits are not for QK-Clip
        try:
            total, count = 0.0, 0
            for mb in batches:
                mb = mb.to(self.device)
                with self.autocast():
                    logits = self.model(mb.input_ids, segment_ids=mb.segment_ids)
                w = mb.num_tokens
                total += float(causal_lm_loss(logits, mb.targets, mb.loss_mask)) * w
                count += w
        finally:
            self.model.record_stats(True)
            self.model.train()
        return total / max(count, 1)

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "tokens": self.tokens,
            "optimizer": self.optimizer.state_dict(),
            "schedule": asdict(self.schedule),
            "base_lrs": self.base_lrs,
        }

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens = state["step"], state["tokens"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.base_lrs = list(state["base_lrs"])


def _config_dict(cfg: TrainConfig) -> dict:
    d = asdict(cfg)
    d["memory"] = asdict(cfg.memory)
    return d


def train_config_from_dict(d: dict) -> TrainConfig:
    d = dict(d)
    d["memory"] = MemoryOptions(**d.get("memory", {}))
    d["parallel"] = ParallelConfig(**d.get("parallel", {"dp": 0}))
    return TrainConfig(**d)


def load_tokenizer(name: str, vocab_size: int):
    from openk2.tokenizer.tokenizer import K2Tokenizer

    if name == "auto":
        name = "byte-level" if vocab_size <= 512 else "default"
    tok = K2Tokenizer.load(name)
    if tok.vocab_size > vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} ids but the model only {vocab_size}")
    return tok


def is_distributed(cfg: TrainConfig) -> bool:
    """Launched by torchrun with several processes, or asked for a parallel layout."""
    p = cfg.parallel
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or p.pp * max(p.dp, 1) * p.ep * p.virtual_stages > 1


def prepare_data(cfg: TrainConfig, vocab_size: int):
    """(tokenizer, training loader, fixed eval batches, facts for the run's config record). Every
    process of a distributed run builds the same loader and so sees the same global batches."""
    from openk2.train.data import PackedLoader, split_tokens, tokenize_corpus

    tokenizer = load_tokenizer(cfg.tokenizer, vocab_size)
    t_tok = time.perf_counter()
    tokens = tokenize_corpus(cfg.corpus, tokenizer, max_chars=cfg.max_chars)
    t_tok = time.perf_counter() - t_tok
    train_tokens, val_tokens = split_tokens(tokens, cfg.val_fraction, cfg.seq_len)
    eos = tokenizer.eos_id if cfg.document_mask else None
    loader = PackedLoader(train_tokens, cfg.batch_size, cfg.seq_len, seed=cfg.seed, eos_id=eos)
    val_batch = max(1, min(cfg.batch_size, (len(val_tokens) - 1) // cfg.seq_len))
    val_loader = PackedLoader(val_tokens, val_batch, cfg.seq_len, shuffle=False, eos_id=eos)
    eval_batches = val_loader.batches(min(cfg.eval_batches, val_loader.n_windows // val_batch))
    facts = {
        "train_tokens": int(len(train_tokens)),
        "val_tokens": int(len(val_tokens)),
        "tokenize_seconds": t_tok,
    }
    return tokenizer, loader, eval_batches, facts


def run_steps(trainer, loader, eval_batches, cfg: TrainConfig, logger, save, last_saved, progress: bool):
    """The step loop of both `pretrain` paths (one process and torchrun): train, log, evaluate and save
    on the configured cadence; a divergence stops the run naming the last good checkpoint. `logger` is
    None on ranks that do not log. Returns (last checkpoint, last train record, seconds)."""
    last = cfg.steps if cfg.stop_at is None else min(cfg.stop_at, cfg.steps)
    bar = tqdm(total=last, initial=trainer.step, disable=not progress, desc="train", unit="step")
    record, t_start = None, time.perf_counter()
    try:
        while trainer.step < last:
            try:
                record = trainer.train_step(loader.batches(cfg.grad_accum))
            except TrainingDiverged as e:
                where = (
                    f"the last good checkpoint is {last_saved}" if last_saved else "no checkpoint was written"
                )
                raise TrainingDiverged(f"{e}; stopping the run ({where}).") from None
            if logger:
                logger.log(record)
            bar.update(1)
            shown = {"loss": ".3f", "tokens_per_s": ".0f", "max_logit": ".1f", "imbalance": ".2f"}
            bar.set_postfix({k: format(record[k], f) for k, f in shown.items() if k in record})
            s = trainer.step
            if eval_batches and (s % cfg.eval_every == 0 or s == cfg.steps):
                loss = trainer.evaluate(eval_batches)  # every rank takes part under torchrun
                if logger:
                    logger.log({"kind": "eval", "step": s, "tokens": trainer.tokens, "loss": loss})
            if s % cfg.save_every == 0 or s == last:
                last_saved = save()
    finally:
        bar.close()
        if logger:
            logger.close()
    return last_saved, record, time.perf_counter() - t_start


def pretrain(cfg: TrainConfig, resume: bool = True) -> dict:
    """Train `cfg.preset` on `cfg.corpus`; resumes from the run's latest checkpoint when there is one.
    Returns a summary (final losses, tokens/s, paths). Raises TrainingDiverged on NaN/inf."""
    from openk2.checkpoint.store import latest_checkpoint, load_trainer_state, save_checkpoint, set_rng_state
    from openk2.checkpoint.store import rng_state as get_rng_state
    from openk2.config import ModelConfig
    from openk2.model.transformer import Transformer
    from openk2.train.logging import RunLogger, plot_run, read_metrics

    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if is_distributed(cfg):
        from openk2.distributed.train import pretrain_distributed

        return pretrain_distributed(cfg, resume)
    device = pick_device(cfg.device)
    run_dir = Path(cfg.out_dir)
    ckpt = latest_checkpoint(run_dir) if resume else None

    torch.manual_seed(cfg.seed)
    model_cfg = ModelConfig.from_preset(cfg.preset)
    tokenizer, loader, eval_batches, facts = prepare_data(cfg, model_cfg.vocab_size)

    model = Transformer(model_cfg).to(device)
    optimizer = build_optimizer(model, cfg)
    schedule = Schedule(cfg.schedule, cfg.steps, min(cfg.warmup_steps, cfg.steps), cfg.decay_fraction,
                        cfg.min_lr_ratio)  # fmt: skip
    trainer = Trainer(model, optimizer, schedule, cfg, device)
    if ckpt is not None:
        from openk2.checkpoint.hf import load_weights_

        state = load_trainer_state(ckpt)
        load_weights_(model, ckpt)
        trainer.load_state_dict(state)
        loader.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        print(f"resuming from {ckpt} (step {trainer.step})")
    logger = RunLogger(run_dir, tensorboard=cfg.tensorboard, append=ckpt is not None)
    if ckpt is None:
        logger.log({"kind": "config", "config": _config_dict(cfg), "model": model_cfg.to_hf_dict(), **facts})

    def save() -> Path:
        state = trainer.state_dict()
        state.update(data=loader.state_dict(), rng=get_rng_state(), config=_config_dict(cfg))
        return save_checkpoint(run_dir, trainer.step, model, tokenizer, state, keep=cfg.keep_checkpoints)

    tok_start = trainer.tokens
    last_saved, record, elapsed = run_steps(
        trainer, loader, eval_batches, cfg, logger, save, ckpt, cfg.progress
    )
    metrics = read_metrics(run_dir)
    png = plot_run(metrics, run_dir / "curves.png", title=f"{cfg.preset} / {cfg.optimizer} on {cfg.corpus}")
    evals = [m for m in metrics if m.get("kind") == "eval"]
    return {
        "run_dir": str(run_dir),
        "checkpoint": str(last_saved) if last_saved else None,
        "curves": str(png),
        "steps": trainer.step,
        "tokens": trainer.tokens,
        "train_loss": record["loss"] if record else None,
        "eval_loss": evals[-1]["loss"] if evals else None,
        "tokens_per_s": (trainer.tokens - tok_start) / elapsed if elapsed > 0 else 0.0,
        "seconds": elapsed,
    }
