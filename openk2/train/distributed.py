"""`openk2 train` under torchrun: the single-process pre-training run on a pp x dp x ep mesh.

    torchrun --standalone --nproc-per-node 4 -m openk2.cli train --preset tiny --pp 2 --ep 2

Same run, same numbers. Every rank works on its rows of the same global batch of `batch_size`
sequences per micro-batch, so the global batch, and with it the loss, the gradient and the update, are
the single-process run's up to floating-point summation order. A streamed corpus (token shards,
`openk2.train.shards`) is read shard-aware: each rank of a stage's batch group (dp x ep) reads only its
rows from the memory-mapped shards (`StreamingLoader.shard_`), the pipeline stages of one batch rank
the same rows; an in-memory corpus is loaded by every rank and sliced (`Mesh.local_batch`). The model
is built on every rank from the same seed and then cut (pipeline chunks) and sharded (expert slices);
the optimizer is `DistributedMuon` (ZeRO-1) with MuonClip's arithmetic, or its AdamW-only mode for
`--optimizer adamw`.

`DistributedTrainer` shares `StepTrainer` (aux-loss override, schedule, counters) with the one-process
`Trainer`, and the run around it (run directory, resume, logs, signals, plots) is the same driver,
`openk2.train.loop.drive_pretraining` on an `openk2.train.run.Run`; rank 0 writes, every rank decides.

Per step (`DistributedTrainer.train_step`, mirroring `Trainer.train_step`):

1. forward/backward of every gradient-accumulation micro-batch, scaled by 1/grad_accum;
2. `reduce_stats`: max logits max-reduced and expert counts summed over the batch group, so QK-Clip
   and the routing-bias update act identically on every rank;
3. the gradient is reduce-scattered and its *global* norm computed (`DistributedMuon.reduce_grads`);
   a NaN/inf loss or norm stops the run before any weight changes; otherwise the shards are clipped
   to `grad_clip` and the update applied;
4. the step's loss, aux loss, max logit, clipped heads and imbalance are reduced for the log, which
   only rank 0 writes (as it alone prints, draws the progress bar and writes PNGs).

Devices: one code path. Each process computes on `resolve_device(--device)` (the GPU numbered by its
LOCAL_RANK under `auto` or `cuda`, else the CPU) and the processes are joined by NCCL for CUDA, gloo
for the CPU; the meshes, expert all-to-alls, pipeline and ZeRO-1 Muon allocate on the parameters'
device. `--precision bf16` (the default on CUDA) runs forwards under bf16 autocast.

Checkpoints are layout-independent, in one of two formats (`--checkpoint-format`):

* `full` (default): the single-process checkpoint. Full tensors are gathered to rank 0, which writes
  the same Hugging Face-layout directory and `trainer_state.pt` (optimizer state in `MuonClip`/`AdamW`
  `state_dict` form, step, data position, RNG, config) as `pretrain`; servable as is. The full model
  and optimizer pass through rank 0: fine up to what one host holds.
* `sharded`: every rank writes its own share with `torch.distributed.checkpoint` into the
  checkpoint's `dcp/` (`openk2.distributed.checkpoint`); rank 0 adds config.json, the tokenizer and
  `trainer_state.pt` without the optimizer, then the manifest, and renames the directory into place
  (complete or absent, as every checkpoint). Nothing is gathered. `openk2 export` turns it into one
  HF directory; `openk2 sample` and `serve` read it directly (assembled in memory).

Either format resumes under any layout or in one process, and the other way round.

Limitation: `--document-mask` (segment ids) is not carried through the pipeline, so it needs pp = 1.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from openk2.checkpoint import load_model
from openk2.checkpoint.sharded import is_sharded
from openk2.distributed import checkpoint as dckpt
from openk2.distributed.device import autocast_context, collective_backend, resolve_device
from openk2.distributed.dist_muon import DistributedMuon
from openk2.distributed.launch import setup
from openk2.distributed.mesh import Mesh, ParallelConfig, all_reduce_, init_from_env, shutdown
from openk2.distributed.parallelize import ParallelModel
from openk2.model.moe import MoE
from openk2.model.transformer import Transformer
from openk2.optim import load_imbalance, update_routing_bias_
from openk2.train.config import TrainConfig
from openk2.train.data import Batch
from openk2.train.loop import (
    StepTrainer,
    build_optimizer,
    causal_lm_loss,
    check_corpus,
    check_finite,
    drive_pretraining,
    make_schedule,
    prepare_data,
)
from openk2.train.memory import activation_context, apply_memory_options
from openk2.train.run import Run
from openk2.train.schedule import Schedule
from openk2.train.shards import StreamingLoader


def resolve_layout(parallel: ParallelConfig, world: int | None = None) -> ParallelConfig:
    """Fill in dp (0: world / (pp * ep)) and check the layout against the processes launched."""
    world = int(os.environ.get("WORLD_SIZE", "1")) if world is None else world
    p = ParallelConfig(**vars(parallel))
    for name in ("pp", "ep", "virtual_stages"):
        if getattr(p, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(p, name)}")
    if p.dp < 0 or p.microbatches < 0:
        raise ValueError("--dp and --microbatches must be >= 0 (0: automatic)")
    if p.dp == 0 and world == 1:
        p.dp = 1
    if p.dp == 0:
        if world % (p.pp * p.ep):
            raise ValueError(f"{world} processes cannot be split into pp={p.pp} x ep={p.ep} x dp")
        p.dp = world // (p.pp * p.ep)
    if world == 1 and p.world_size > 1:
        raise ValueError(
            f"--pp {p.pp} --dp {p.dp} --ep {p.ep} needs {p.world_size} processes: launch with "
            f"`torchrun --standalone --nproc-per-node {p.world_size} -m openk2.cli train ...`"
        )
    return p.validate(world)


def _world():
    return dist.group.WORLD if dist.is_initialized() else None


class DistributedTrainer(StepTrainer):
    """`Trainer` on a mesh: same step, statistics, clipping and divergence check; see the module doc."""

    def __init__(
        self,
        model: Transformer,
        mesh: Mesh,
        schedule: Schedule,
        cfg: TrainConfig,
        device: torch.device | None = None,
        local_rows: bool = False,
    ):
        """local_rows: the batches handed to `train_step` are already this rank's rows (a shard-aware
        loader); otherwise they are global batches and each rank takes its rows."""
        super().__init__(model, schedule, cfg)
        self.mesh = mesh
        self.config = model.config
        self.device = device or torch.device("cpu")
        self.local_rows = local_rows
        self.pm = ParallelModel(model.to(self.device), mesh)
        for ch in self.pm.chunks:
            apply_memory_options(ch, cfg.memory)
        tau = cfg.qk_clip_tau if cfg.optimizer == "muonclip" else None
        self.optimizer = DistributedMuon(
            self.pm, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum, qk_clip_tau=tau,
            adamw_only=cfg.optimizer == "adamw", ns_dtype=cfg.ns_dtype,
        )  # fmt: skip
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.params = self.pm.parameters()
        self._aux = 0.0  # sum of the MoE layers' aux losses over this rank's forwards of the step
        for ch in self.pm.chunks:
            for m in ch.modules():
                if isinstance(m, MoE):
                    m.register_forward_hook(self._on_moe)
        p = mesh.parallel
        self.pipe_mb = p.n_microbatches() if p.pp > 1 else 1  # forwards per layer per micro-batch

    def _on_moe(self, mod: MoE, args, out) -> None:
        if mod.training and mod.compute_aux_loss and mod.aux_loss_alpha > 0 and mod.aux_loss is not None:
            self._aux += float(mod.aux_loss.detach())

    def check_batch(self, batch_size: int) -> None:
        """The global batch must split into the batch group and each rank's share into micro-batches."""
        n = self.mesh.batch_size
        if batch_size % n:
            raise ValueError(f"--batch-size {batch_size} is not divisible by dp * ep = {n}")
        if (batch_size // n) % self.pipe_mb:
            raise ValueError(
                f"each rank's {batch_size // n} sequences do not split into {self.pipe_mb} pipeline "
                "micro-batches; change --batch-size or --microbatches"
            )

    # ------------------------------------------------------------------ one step
    def _forward_backward(self, mb: Batch, n: int) -> float:
        """This rank's rows of one global micro-batch; gradients of loss / n accumulate. Returns this
        rank's mean loss (0 on pipeline stages without the head)."""
        mesh, pm = self.mesh, self.pm
        if mb.loss_mask is not None:
            raise ValueError("loss masks are not supported by distributed pre-training")
        rows = (lambda t: t) if self.local_rows else mesh.local_batch
        x, y = rows(mb.input_ids).to(self.device), rows(mb.targets).to(self.device)
        with (
            activation_context(self.cfg.memory, self.device),
            autocast_context(self.device, self.cfg.precision),
        ):
            if pm.pipeline is None:
                model = pm.chunks[0]
                seg = None if mb.segment_ids is None else rows(mb.segment_ids).to(self.device)
                loss = causal_lm_loss(model(x, segment_ids=seg), y)
                ((loss + model.aux_loss()) / n).backward()
                return float(loss.detach())
            held = [p.grad for p in self.params]  # the schedule rescales all of .grad: keep ours apart
            for p in self.params:
                p.grad = None
            loss = pm.pipeline.step(x, y)
        for p, g in zip(self.params, held):
            if p.grad is not None and n > 1:
                p.grad.div_(n)
            if g is not None:
                p.grad = g if p.grad is None else g.add_(p.grad)
        return 0.0 if loss is None else float(loss)

    def train_step(self, micro_batches: list[Batch]) -> dict:
        """One optimizer step over global micro-batches (the same on every rank); the same metrics as
        `Trainer.train_step`, identical on every rank."""
        t0 = time.perf_counter()
        self.pm.train()
        scale = self.begin_step()
        self.pm.reset_stats()
        self._aux = 0.0
        n = len(micro_batches)
        loss_sum, tokens = 0.0, 0
        for mb in micro_batches:
            loss_sum += self._forward_backward(mb, n)
            tokens += mb.num_tokens * (self.mesh.batch_size if self.local_rows else 1)
        sums = all_reduce_(self._tensor([loss_sum, self._aux], torch.float64), _world())
        per = self.mesh.batch_size * n  # every (batch rank, micro-batch) contributed one mean
        loss_value, aux_value = float(sums[0]) / per, float(sums[1]) / (per * self.pipe_mb)

        self.pm.reduce_stats()
        chunks = self.pm.chunks
        logits = [m for ch in chunks for m in ch.max_attention_logits().values()]
        counts = {k: c for ch in chunks for k, c in ch.expert_counts().items()}
        local_max = max((float(m.max()) for m in logits), default=float("-inf"))
        maxes = all_reduce_(self._tensor([local_max, load_imbalance(counts)]), _world(), dist.ReduceOp.MAX)
        grad_norm = self.optimizer.reduce_grads()
        check_finite(self.step + 1, loss_value, grad_norm)
        coef = self.cfg.grad_clip / (grad_norm + 1e-6)  # torch.nn.utils.clip_grad_norm_'s rule
        if coef < 1:
            self.optimizer.clip_grads_(coef)
        clipped = self.optimizer.step()
        for ch in chunks:
            for blk in ch.layers.values():  # consumed (or unused without QK-Clip): no stale numbers
                blk.self_attn.max_logits = None
            update_routing_bias_(ch, rate=self.cfg.bias_update_rate)
        # each batch-group rank clipped the same heads; the pp ranks clipped different layers
        clipped = int(all_reduce_(self._tensor(clipped), _world())) // self.mesh.batch_size
        return self.end_step(
            tokens,
            scale,
            t0,
            loss=loss_value,
            aux_loss=aux_value,
            grad_norm=grad_norm,
            max_logit=float(maxes[0]) if math.isfinite(maxes[0]) else float("nan"),  # -inf: none recorded
            heads_clipped=clipped,
            imbalance=float(maxes[1]),
        )

    def _tensor(self, values, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A small tensor for a collective, on the device the backend communicates from."""
        return torch.tensor(values, dtype=dtype, device=self.device)

    # ------------------------------------------------------------------ evaluation
    def _forward(self, input_ids: torch.Tensor, segment_ids: torch.Tensor | None) -> torch.Tensor | None:
        """Forward of a whole batch through the chunks in order (no pipelining: evaluation is rare).
        Every rank of a stage runs the same rows, so expert all-to-alls pair up. Returns the logits on
        the last stage, None elsewhere."""
        pp, chunks = self.mesh.parallel.pp, self.pm.chunks
        input_ids = input_ids.to(self.device)
        if pp == 1:
            seg = None if segment_ids is None else segment_ids.to(self.device)
            return chunks[0](input_ids, segment_ids=seg)
        ranks, me = self.mesh.pp_ranks, self.mesh.pp_rank
        n_chunks = pp * self.mesh.parallel.virtual_stages
        b, s = input_ids.shape
        h = input_ids
        for c in range(n_chunks):
            if c % pp != me:
                continue
            if c > 0:
                h = torch.empty(b, s, self.config.hidden_size, dtype=self.params[0].dtype, device=self.device)
                dist.recv(h, ranks[(c - 1) % pp])
            h = chunks[c // pp](h)
            if c < n_chunks - 1:
                dist.send(h.to(self.params[0].dtype).contiguous(), ranks[(c + 1) % pp])
        return h if self.mesh.is_last_stage else None

    @torch.no_grad()
    def evaluate(self, batches: list[Batch]) -> float:
        """Mean eval loss (the same number as `Trainer.evaluate`), on every rank."""
        for ch in self.pm.chunks:
            ch.eval()
            ch.record_stats(False)
        try:
            total, count = 0.0, 0
            for mb in batches:
                with autocast_context(self.device, self.cfg.precision):
                    logits = self._forward(mb.input_ids, mb.segment_ids)
                if logits is not None:
                    mb = mb.to(self.device)
                    total += float(causal_lm_loss(logits, mb.targets, mb.loss_mask)) * mb.num_tokens
                count += mb.num_tokens
            total = float(all_reduce_(self._tensor(total, torch.float64), self.mesh.pp_group))
        finally:
            for ch in self.pm.chunks:
                ch.record_stats(True)
                ch.train()
        return total / max(count, 1)

    # ------------------------------------------------------------------ checkpoints
    def save(self, run: Run, tokenizer, extra: dict) -> Path:
        """Write this step's checkpoint in the configured format (see the module doc). Collective."""
        if self.mesh.parallel.checkpoint == "sharded":
            return self._save_sharded(run, tokenizer, extra)
        return self._save_full(run, tokenizer, extra)

    def _save_sharded(self, run: Run, tokenizer, extra: dict) -> Path | None:
        """Every rank writes its share into rank 0's temporary checkpoint directory (whose name rank 0
        broadcasts); rank 0 adds config.json, tokenizer and trainer state, then publishes it."""

        def write_shards(tmp: Path) -> None:  # on rank 0, inside save_checkpoint
            dist.broadcast_object_list([str(tmp)], src=0)
            dckpt.save_shards(tmp, self.pm, self.optimizer)
            self.config.save_pretrained(tmp)

        path = None
        if self.mesh.rank == 0:
            path = run.save(
                self.step, None, tokenizer, {**self.counters(), **extra}, write_model=write_shards
            )
        else:
            where = [None]
            dist.broadcast_object_list(where, src=0)
            dckpt.save_shards(where[0], self.pm, self.optimizer)
        dist.barrier()
        return path

    def _save_full(self, run: Run, tokenizer, extra: dict) -> Path:
        """Write `pretrain`'s checkpoint (HF layout + trainer_state.pt) from rank 0."""
        mesh = self.mesh
        model_sd, optim = dckpt.gather_stage(self.pm, self.optimizer)
        if mesh.parallel.pp > 1 and mesh.dp_rank == 0 and mesh.ep_rank == 0:  # rank 0's pp group
            parts = [None] * mesh.parallel.pp if mesh.rank == 0 else None
            dist.gather_object((model_sd, optim), parts, dst=0, group=mesh.pp_group)
            if mesh.rank == 0:
                for m, o in parts[1:]:
                    model_sd.update(m)
                    optim.update(o)
        path = None
        if mesh.rank == 0:
            with torch.device("meta"):
                full = Transformer(self.config)
            full.to_empty(device="cpu")
            full.load_state_dict(model_sd)
            full.rotary.reset_parameters(self.config)
            opt = build_optimizer(full, self.cfg)  # the one-process optimizer
            named = dict(full.named_parameters())
            adamw = isinstance(opt, torch.optim.AdamW)
            for name, state in optim.items():
                state = dict(state)
                if adamw:  # torch's AdamW keeps its step count as a float tensor
                    state["step"] = torch.tensor(float(state["step"]))
                opt.state[named[name]] = state
            path = run.save(
                self.step, full, tokenizer, {**self.counters(), "optimizer": opt.state_dict(), **extra}
            )
        dist.barrier()
        return path

    def load(self, ckpt: Path, state: dict) -> None:
        """Load a checkpoint of either format (written under any layout, or by one process) into this
        rank's share: weights, routing biases, optimizer state, step and token counts."""
        if is_sharded(ckpt):
            dckpt.load_shards(ckpt, self.pm, self.optimizer)
            self.load_counters(state)
            return
        full = load_model(ckpt, dtype=self.params[0].dtype)
        opt = build_optimizer(full, self.cfg)  # the one-process optimizer
        opt.load_state_dict(state["optimizer"])
        optim = {}
        for name, p in full.named_parameters():
            if p in opt.state:
                optim[name] = {k: int(v) if k == "step" else v for k, v in opt.state[p].items()}
        dckpt.load_full(self.pm, self.optimizer, full.to(self.device).state_dict(), optim, str(ckpt))
        self.load_counters(state)


def pretrain_distributed(cfg: TrainConfig, model_cfg, resume: bool = True, overwrite: bool = False) -> dict:
    """`pretrain` on the mesh `cfg.parallel` under torchrun (called by `pretrain`). Returns the same
    summary on every rank, plus "rank" and "layout"; only rank 0 logs, prints and plots."""
    device = resolve_device(cfg.device)  # this process's GPU (LOCAL_RANK) or the CPU; one-line error
    parallel = resolve_layout(cfg.parallel)
    if cfg.document_mask and parallel.pp > 1:
        raise ValueError("--document-mask needs --pp 1: segment ids are not passed through the pipeline")
    # torch deprecates the collective names DistributedMuon uses (they still work); one warning per
    # rank per run is noise for the user, not news
    warnings.filterwarnings(
        "ignore",
        r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated",
        FutureWarning,
    )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    init_from_env(collective_backend(device))
    mesh = setup(parallel)
    finished = False
    try:
        summary = _run(cfg, model_cfg, mesh, device, resume, overwrite)
        finished = True
        return summary
    finally:
        shutdown(finished)


def _run(
    cfg: TrainConfig, model_cfg, mesh: Mesh, device: torch.device, resume: bool, overwrite: bool
) -> dict:
    rank0 = mesh.rank == 0
    check_corpus(cfg, warn=rank0)
    run = Run(cfg, job="pretrain", config=asdict(cfg), model_config=model_cfg, resume=resume,
              overwrite=overwrite, is_main=rank0, barrier=dist.barrier)  # fmt: skip
    state = run.open()
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank, and as one process
    tokenizer, loader, eval_batches, facts = prepare_data(cfg, model_cfg.vocab_size)
    shard_aware = isinstance(loader, StreamingLoader)
    trainer = DistributedTrainer(Transformer(model_cfg), mesh, make_schedule(cfg), cfg, device, shard_aware)
    trainer.check_batch(cfg.batch_size)
    if shard_aware:  # each batch rank reads only its rows of the memory-mapped shards
        loader.shard_(mesh.batch_rank, mesh.batch_size)

    def agree(stop: bool) -> bool:
        """Stop when any rank was signalled (the save that follows is collective)."""
        return bool(all_reduce_(trainer._tensor(int(stop)), dist.group.WORLD, dist.ReduceOp.MAX))

    p = mesh.parallel
    layout = {"pp": p.pp, "dp": p.dp, "ep": p.ep, "virtual_stages": p.virtual_stages,
              "microbatches": trainer.pipe_mb, "world_size": p.world_size}  # fmt: skip
    where = f"{device.type} x {p.world_size} processes (pp {p.pp}, dp {p.dp}, ep {p.ep})"
    summary = drive_pretraining(cfg, model_cfg, run, state, trainer, tokenizer, loader, eval_batches, facts,
                                where, layout=layout, agree=agree)  # fmt: skip
    return {"rank": mesh.rank, "layout": layout, **summary}
