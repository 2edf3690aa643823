"""The optimizer step of pre-training and SFT, and the pre-training run.

Pieces, each usable on its own:

* `causal_lm_loss(logits, targets, mask)`: mean next-token cross-entropy over the counted positions.
* `build_optimizer(model, cfg)`: MuonClip, plain Muon (no clip) or AdamW with the same decay split.
* `Trainer.train_step(micro_batches)`: one optimizer step over gradient-accumulated micro-batches:
  forward (bf16 autocast where the hardware has bf16 units, see `--precision`), loss (+ the
  sequence-wise aux loss), backward, gradient clipping, a finite-loss check *before* the update (a
  NaN never reaches the weights), the MuonClip step with QK-Clip from the max logits of all the
  step's micro-batches, then the routing-bias update from the step's expert counts.
* `Trainer.evaluate(batches)`, `Trainer.state_dict()` / `load_state_dict()` for checkpoints.
* `StepTrainer`: what `Trainer` shares with the torchrun `DistributedTrainer` (aux-loss override,
  counters, the schedule's learning rate).
* `pretrain(cfg)`: the whole pre-training run behind `openk2 train`: the model (a preset or any HF
  config.json), the data, and `drive_pretraining`, which runs either trainer on the one run driver
  (`openk2.train.run.Run`: run directory, resume, logs, signals). Under torchrun (or with a parallel
  layout in `cfg.parallel`) the trainer is `openk2.train.distributed.DistributedTrainer` on a
  pp x dp x ep mesh, which writes the same checkpoints.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from openk2.optim import MuonClip, load_imbalance, update_routing_bias_
from openk2.optim.muon import split_parameters
from openk2.train.config import NS_DTYPES, OPTIMIZERS, OptimizerOptions, TrainConfig
from openk2.train.data import Batch
from openk2.train.memory import activation_context, apply_memory_options
from openk2.train.run import Run, TrainingDiverged
from openk2.train.schedule import Schedule
from openk2.train.shards import is_streamed_corpus

__all__ = ["NS_DTYPES", "OPTIMIZERS", "TrainConfig", "Trainer", "TrainingDiverged", "pretrain"]


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


def build_optimizer(model: nn.Module, cfg: OptimizerOptions) -> torch.optim.Optimizer:
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
    """The run's device (`openk2.distributed.device.resolve_device`: auto, cpu, cuda, cuda:N)."""
    from openk2.distributed.device import resolve_device

    return resolve_device(name)


class StepTrainer:
    """What every optimizer-step trainer shares (this module's `Trainer`, one process, and
    `openk2.train.distributed.DistributedTrainer`, on a mesh): the config's aux-loss override, the
    step and token counters, the schedule's learning rate at the start of each step, and the
    counters' part of the trainer state."""

    optimizer: torch.optim.Optimizer

    def __init__(self, model: nn.Module, schedule: Schedule, cfg: TrainConfig):
        self.schedule, self.cfg = schedule, cfg
        self.step = 0
        self.tokens = 0
        if cfg.aux_loss_alpha is not None:
            for m in model.modules():
                if hasattr(m, "aux_loss_alpha"):
                    m.aux_loss_alpha = cfg.aux_loss_alpha

    def begin_step(self) -> float:
        """Set this step's learning rates and clear the gradients; returns the schedule's factor."""
        scale = self.schedule(self.step)
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = base * scale
        self.optimizer.zero_grad(set_to_none=True)
        return scale

    def end_step(self, step_tokens: int, scale: float, t0: float, **metrics) -> dict:
        """Count the finished step and its tokens; return its record (`train_record`), given the
        step's loss, aux_loss, grad_norm, max_logit, heads_clipped and imbalance."""
        self.step += 1
        self.tokens += step_tokens
        return train_record(step=self.step, tokens=self.tokens, lr=self.base_lrs[0] * scale,
                            step_tokens=step_tokens, seconds=time.perf_counter() - t0, **metrics)  # fmt: skip

    def counters(self) -> dict:
        return {"step": self.step, "tokens": self.tokens, "schedule": asdict(self.schedule),
                "base_lrs": self.base_lrs}  # fmt: skip

    def load_counters(self, state: dict) -> None:
        self.step, self.tokens = state["step"], state["tokens"]
        self.base_lrs = list(state["base_lrs"])


class Trainer(StepTrainer):
    """One process: owns model, optimizer and schedule; counts steps and tokens."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        schedule: Schedule,
        cfg: TrainConfig,
        device: torch.device | None = None,
    ):
        super().__init__(model, schedule, cfg)
        self.model, self.optimizer = model, optimizer
        self.device = device or next(model.parameters()).device
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.model.record_stats(True)  # max logits (QK-Clip, logs) and the sequence aux loss
        apply_memory_options(model, cfg.memory)

    def autocast(self):
        from openk2.distributed.device import autocast_context

        return autocast_context(self.device, self.cfg.precision)

    def train_step(self, micro_batches: list[Batch]) -> dict:
        """One optimizer step; returns its metrics. Raises TrainingDiverged (weights untouched) on a
        non-finite loss or gradient norm."""
        t0 = time.perf_counter()
        self.model.train()
        scale = self.begin_step()
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
        return self.end_step(
            tokens,
            scale,
            t0,
            loss=loss_value,
            aux_loss=aux_sum / n,
            grad_norm=grad_norm,
            max_logit=max(float(m.max()) for m in max_logits.values()) if max_logits else float("nan"),
            heads_clipped=clipped,
            imbalance=load_imbalance(counts),
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
        return {**self.counters(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.load_counters(state)
        self.optimizer.load_state_dict(state["optimizer"])

    def load(self, checkpoint: Path, state: dict) -> None:
        """Resume from a run checkpoint: its weights (routing biases included) and trainer state."""
        from openk2.checkpoint.hf import load_weights_
        from openk2.checkpoint.sharded import is_sharded, load_optimizer_state_

        load_weights_(self.model, checkpoint)  # either format
        if is_sharded(checkpoint):  # written under torchrun by every rank (distributed.checkpoint)
            load_optimizer_state_(self.optimizer, self.model, checkpoint)
            return self.load_counters(state)
        self.load_state_dict(state)

    def save(self, run: Run, tokenizer, extra: dict) -> Path:
        """Write the run's checkpoint for the current step."""
        return run.save(self.step, self.model, tokenizer, {**self.state_dict(), **extra})


def tokenizer_by_name(name: str, vocab_size: int):
    """The run's tokenizer by name ("auto": byte-level for vocabularies up to 512, else default)."""
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


def check_corpus(cfg: TrainConfig, warn: bool = True) -> None:
    """Before anything is written: the corpus exists (FileNotFoundError), and invalid UTF-8 in it
    is a warning with the count (printed when `warn`), or a ValueError with `strict_utf8`."""
    from openk2.train.data import check_utf8

    bad = check_utf8(cfg.corpus, strict=cfg.strict_utf8)
    if bad and warn:
        print(f"warning: {bad}", file=sys.stderr)


def prepare_data(cfg: TrainConfig, vocab_size: int):
    """(tokenizer, training loader, fixed eval batches, facts for the run's config record). Every
    process of a distributed run builds the same loader and so sees the same global batches."""
    from openk2.train.data import PackedLoader, split_tokens, tokenize_corpus

    tokenizer = tokenizer_by_name(cfg.tokenizer, vocab_size)
    if is_streamed_corpus(cfg.corpus):
        return tokenizer, *streamed_data(cfg, tokenizer)
    t_tok = time.perf_counter()
    tokens = tokenize_corpus(cfg.corpus, tokenizer, max_chars=cfg.max_chars)
    t_tok = time.perf_counter() - t_tok
    train_tokens, val_tokens = split_tokens(tokens, cfg.val_fraction, cfg.seq_len)
    eos = tokenizer.eos_id if cfg.document_mask else None
    loader = PackedLoader(train_tokens, cfg.batch_size, cfg.seq_len, seed=cfg.seed, eos_id=eos)
    facts = {
        "train_tokens": int(len(train_tokens)),
        "val_tokens": int(len(val_tokens)),
        "tokenize_seconds": t_tok,
    }
    return tokenizer, loader, fixed_eval_batches(val_tokens, cfg, eos), facts


def fixed_eval_batches(val_tokens, cfg: TrainConfig, eos: int | None) -> list[Batch]:
    """Up to `cfg.eval_batches` batches of consecutive windows from the held-out tokens, in order."""
    from openk2.train.data import PackedLoader

    val_batch = max(1, min(cfg.batch_size, (len(val_tokens) - 1) // cfg.seq_len))
    val_loader = PackedLoader(val_tokens, val_batch, cfg.seq_len, shuffle=False, eos_id=eos)
    return val_loader.batches(min(cfg.eval_batches, val_loader.n_windows // val_batch))


def streamed_data(cfg: TrainConfig, tokenizer):
    """A JSONL / Parquet corpus: tokenised once into memory-mapped shards (cached under the data
    cache, keyed by the sources and the tokenizer) and streamed; the tail is held out for evals."""
    import hashlib

    from openk2.train.data import default_cache_dir, held_out_tokens
    from openk2.train.shards import StreamingLoader, TokenShards, build_shards, tokenizer_fingerprint

    source = Path(cfg.corpus).expanduser().resolve()
    key = hashlib.sha1(f"{source}:{tokenizer_fingerprint(tokenizer)}".encode()).hexdigest()[:12]
    t_tok = time.perf_counter()
    shards = TokenShards(build_shards(source, tokenizer, default_cache_dir() / "shards" / key), tokenizer)
    t_tok = time.perf_counter() - t_tok
    n_val = held_out_tokens(len(shards), cfg.val_fraction, cfg.seq_len)
    eos = tokenizer.eos_id if cfg.document_mask else None
    loader = StreamingLoader(shards, cfg.batch_size, cfg.seq_len, eos_id=eos, limit=len(shards) - n_val)
    # only the tail the eval batches use is read into memory, not the whole held-out part
    needed = min(n_val, cfg.eval_batches * cfg.batch_size * cfg.seq_len + 1)
    eval_batches = fixed_eval_batches(shards.read(len(shards) - n_val, needed), cfg, eos)
    facts = {"train_tokens": len(shards) - n_val, "val_tokens": n_val, "tokenize_seconds": t_tok}
    return loader, eval_batches, facts


def startup_summary(
    cfg: TrainConfig, model_cfg, facts: dict, run: Run, resumed_step: int | None, where: str
) -> str:
    """What the run is about to do, printed before the first step (the ETA follows the first step)."""
    from openk2.model.transformer import Transformer
    from openk2.optim.muon import resolve_ns_dtype

    with torch.device("meta"):
        counted = Transformer(model_cfg)
    total, active = counted.num_parameters(), counted.num_parameters(activated=True)
    from openk2.distributed.device import bf16_emulated, resolve_precision

    device = pick_device(cfg.device)
    ns = "n/a (AdamW)"
    if cfg.optimizer != "adamw":
        ns = str(resolve_ns_dtype(cfg.ns_dtype, device)).removeprefix("torch.")
    precision = resolve_precision(device, cfg.precision)
    if precision == "bf16":
        precision += " autocast" + (
            " (emulated: this CPU has no bf16 units)" if bf16_emulated(device, "bf16") else ""
        )
    precision += f" (--precision {cfg.precision})"
    threads = torch.get_num_threads()
    step_tokens = cfg.batch_size * cfg.seq_len * cfg.grad_accum
    epochs = cfg.steps * step_tokens / max(facts["train_tokens"], 1)
    start = f"resuming at step {resumed_step}" if resumed_step is not None else f"new run {run.run_id}"
    return "\n".join([
        f"model {cfg.model_name} ({model_cfg.model_type}): {total / 1e6:,.2f}M parameters, "
        f"{active / 1e6:,.2f}M activated per token",
        f"device {where}, {threads} thread{'s' if threads != 1 else ''}, precision {precision}; optimizer "
        f"{cfg.optimizer}, lr {cfg.lr:g}, Newton-Schulz in {ns}",
        f"corpus {cfg.corpus}: {facts['train_tokens']:,} training + {facts['val_tokens']:,} held-out tokens; "
        f"{cfg.steps} steps x {step_tokens:,} tokens = {epochs:.2f} epochs",
        f"output {run.dir} ({start}); ETA after the first step",
    ])  # fmt: skip


def warn_emulated_bf16(cfg: TrainConfig) -> None:
    """One warning line when `--precision bf16` was asked for on a CPU without bf16 units: it runs
    (bf16 is emulated, numerically the same) but slower than fp32, so it is allowed, not refused."""
    from openk2.distributed.device import bf16_emulated

    if bf16_emulated(pick_device(cfg.device), cfg.precision):
        print(
            "warning: --precision bf16 on a CPU without bf16 units (no avx512_bf16 or amx_bf16): bf16 "
            "matmuls are emulated and slower than fp32; --precision auto picks fp32 here",
            file=sys.stderr,
        )


def pretrain(cfg: TrainConfig, resume: bool = True, overwrite: bool = False) -> dict:
    """Train the configured model on `cfg.corpus` in one process, or under torchrun on the mesh
    `cfg.parallel` (`openk2.train.distributed`); resumes the run in `cfg.out_dir` when it has a
    checkpoint (see `openk2.train.run.Run` for what is refused). Returns a summary (final losses,
    tokens/s, paths; "interrupted" when a signal stopped it). Raises TrainingDiverged on NaN/inf."""
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model_cfg = cfg.build_model_config()
    if is_distributed(cfg):
        from openk2.train.distributed import pretrain_distributed

        return pretrain_distributed(cfg, model_cfg, resume, overwrite)
    device = pick_device(cfg.device)
    check_corpus(cfg)
    run = Run(
        cfg, job="pretrain", config=asdict(cfg), model_config=model_cfg, resume=resume, overwrite=overwrite
    )
    state = run.open()
    torch.manual_seed(cfg.seed)
    tokenizer, loader, eval_batches, facts = prepare_data(cfg, model_cfg.vocab_size)

    from openk2.model.transformer import Transformer

    model = Transformer(model_cfg).to(device)
    trainer = Trainer(model, build_optimizer(model, cfg), make_schedule(cfg), cfg, device)
    where = str(device) if device.type != "cuda" else f"{device} ({torch.cuda.get_device_name(device)})"
    return drive_pretraining(
        cfg, model_cfg, run, state, trainer, tokenizer, loader, eval_batches, facts, where
    )


def make_schedule(cfg: TrainConfig) -> Schedule:
    return Schedule(
        cfg.schedule, cfg.steps, min(cfg.warmup_steps, cfg.steps), cfg.decay_fraction, cfg.min_lr_ratio
    )


def drive_pretraining(cfg, model_cfg, run: Run, state, trainer, tokenizer, loader, eval_batches, facts,
                      where: str, layout: dict | None = None, agree=lambda stop: stop) -> dict:  # fmt: skip
    """The pre-training run around either trainer (`Trainer`, `DistributedTrainer`): resume, log,
    loop, plot and summarise. Only the main process (`run.is_main`) writes and prints."""
    from openk2.checkpoint.store import rng_state, set_rng_state
    from openk2.train.logging import ConsoleLog, peak_tflops, plot_run, read_metrics, train_flops_per_token

    if state is not None:
        trainer.load(run.checkpoint, state)
        loader.load_state_dict(state["data"])
        set_rng_state(state["rng"])
    if run.is_main:
        resumed = state["step"] if state is not None else None
        warn_emulated_bf16(cfg)
        print(startup_summary(cfg, model_cfg, facts, run, resumed, where), flush=True)
    if state is None:
        extra = {"layout": layout} if layout else {}
        run.log({"kind": "config", "config": asdict(cfg), "model": model_cfg.to_hf_dict(),
                 "run_id": run.run_id, **extra, **facts})  # fmt: skip

    def save() -> Path:
        return trainer.save(run, tokenizer, {"data": loader.state_dict(), "rng": rng_state()})

    def evaluate(step: int) -> dict | None:
        if not eval_batches:
            return None
        loss = trainer.evaluate(eval_batches)  # every rank takes part under torchrun
        return {"kind": "eval", "step": step, "tokens": trainer.tokens, "loss": loss}

    from openk2.model.transformer import Transformer

    with torch.device("meta"):
        active = Transformer(model_cfg).num_parameters(activated=True)
    last = cfg.steps if cfg.stop_at is None else min(cfg.stop_at, cfg.steps)
    console = ConsoleLog(last, cfg.log_every, train_flops_per_token(model_cfg, cfg.seq_len, active),
                         peak_tflops(pick_device(cfg.device)), start_tokens=trainer.tokens)  # fmt: skip
    tok_start = trainer.tokens
    result = run.loop(
        lambda: trainer.train_step(loader.batches(cfg.grad_accum)),
        start_step=trainer.step, last_step=last, save_fn=save, eval_fn=evaluate, agree=agree, console=console,
    )  # fmt: skip
    summary = {
        "run_dir": str(run.dir),
        "checkpoint": str(result.last_saved) if result.last_saved else None,
        "curves": None,
        "steps": trainer.step,
        "tokens": trainer.tokens,
        "train_loss": result.record["loss"] if result.record else None,
        "eval_loss": None,
        "tokens_per_s": (trainer.tokens - tok_start) / result.seconds if result.seconds > 0 else 0.0,
        "seconds": result.seconds,
        "interrupted": result.interrupted,
    }
    if run.is_main:
        metrics = read_metrics(run.dir)
        title = f"{cfg.model_name} / {cfg.optimizer} on {Path(cfg.corpus).name}"
        if layout:
            title += f" (pp {layout['pp']}, dp {layout['dp']}, ep {layout['ep']})"
        summary["curves"] = str(plot_run(metrics, run.dir / "curves.png", title=title))
        evals = [m for m in metrics if m.get("kind") == "eval"]
        summary["eval_loss"] = evals[-1]["loss"] if evals else None
    return summary
