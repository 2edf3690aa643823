"""Pipeline parallelism with virtual stages, on `torch.distributed.pipelining`.

The model is cut by layers into pp * v chunks. Rank r of the pp group holds chunks r, r + pp, ...
(the "looped" assignment interleaved 1F1B needs), chunk 0 keeps the embedding and the last chunk the
final norm and LM head. A chunk is the model itself with the modules it does not own deleted (the
torchtitan pattern): `Transformer.forward` skips a missing embedding or head, so parameter names stay
global (`layers.7.self_attn...`) and checkpoints do not care how the model was cut.

Losses: the schedule calls `loss_fn` per micro-batch and, with `scale_grads`, divides the gradients by
the number of micro-batches, so a mean cross-entropy per micro-batch gives the gradient of the mean
over the whole batch -- the same as one process on the full batch. The MoE sequence-wise auxiliary
loss lives inside the chunks, not at the end of the pipeline, so each chunk adds it through
`AddAuxLoss`: the identity on the hidden states whose backward also seeds the aux loss with gradient 1.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

from openk2.distributed.mesh import Mesh
from openk2.model.transformer import Transformer


def split_layers(n_layers: int, n_chunks: int) -> list[range]:
    """Contiguous layer ranges, as even as possible; the first and last chunk, which also carry the
    embedding and the head, get the smaller share when the split is uneven."""
    if n_chunks > n_layers:
        raise ValueError(
            f"cannot cut {n_layers} layers into {n_chunks} pipeline chunks (pp * virtual stages)"
        )
    base, extra = divmod(n_layers, n_chunks)
    sizes = [base] * n_chunks
    middle = list(range(1, n_chunks - 1)) or list(range(n_chunks))
    for i in range(extra):  # spread the remainder over the middle chunks first
        sizes[middle[i % len(middle)]] += 1
    out, start = [], 0
    for s in sizes:
        out.append(range(start, start + s))
        start += s
    return out


def chunk_ids(mesh: Mesh) -> list[int]:
    p = mesh.parallel
    return [mesh.pp_rank + i * p.pp for i in range(p.virtual_stages)]


def make_chunk(model: Transformer, chunk: int, n_chunks: int) -> Transformer:
    """A copy of `model` holding only chunk `chunk` of `n_chunks`."""
    keep = split_layers(model.config.num_hidden_layers, n_chunks)[chunk]
    part = copy.deepcopy(model)
    for i in list(part.layers.keys()):
        if int(i) not in keep:
            del part.layers[i]
    if chunk != 0:
        part.embed_tokens = None
    if chunk != n_chunks - 1:
        part.norm = None
        part.lm_head = None
    return part


class AddAuxLoss(torch.autograd.Function):
    """y = x in the forward; the backward passes x's gradient through and gives `aux` gradient 1, so
    a loss computed in the middle of a pipeline is trained without being carried to its end."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        ctx.aux_shape = aux.shape
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, torch.ones(ctx.aux_shape, dtype=grad.dtype, device=grad.device)


class StageModule(nn.Module):
    """What a pipeline stage runs: a model chunk plus its share of the auxiliary loss."""

    def __init__(self, chunk: Transformer, with_aux_loss: bool = True):
        super().__init__()
        self.chunk = chunk
        self.with_aux_loss = with_aux_loss
        # the dtype the stages' send/receive buffers are declared with; under bf16 autocast the
        # logits come out in bf16 and are sent (and given to the loss) in this dtype
        self.dtype = next(chunk.parameters()).dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.chunk(x).to(self.dtype)
        if self.training and self.with_aux_loss:
            aux = self.chunk.aux_loss()
            if aux.requires_grad:
                y = AddAuxLoss.apply(y, aux)
        return y


class Pipeline:
    """This rank's model chunks and the schedule that runs them.

    Stages are given their input and output shapes up front ("static" metadata), built on the first
    step and again whenever the batch shape changes: the alternative, letting the stages infer shapes
    with an extra forward on their first call, would run the model on placeholder tensors and pollute
    the statistics (max logits, expert counts) that QK-Clip and load balancing read.

    Schedule: 1F1B with one chunk per rank (GPipe when there are fewer micro-batches than stages),
    interleaved 1F1B with several chunks per rank (virtual stages)."""

    def __init__(self, model: Transformer, mesh: Mesh, loss_fn, device="cpu", with_aux_loss: bool = True):
        p = mesh.parallel
        self.mesh, self.loss_fn, self.device = mesh, loss_fn, torch.device(device)
        self.n_chunks = p.pp * p.virtual_stages
        self.ids = chunk_ids(mesh)
        self.chunks = [make_chunk(model, c, self.n_chunks) for c in self.ids]
        self.modules = [StageModule(ch, with_aux_loss) for ch in self.chunks]
        self.n_mb = p.n_microbatches()
        if p.virtual_stages > 1 and self.n_mb % p.pp:
            raise ValueError(f"interleaved 1F1B needs microbatches ({self.n_mb}) divisible by pp ({p.pp})")
        self.config = model.config
        self.dtype = next(model.parameters()).dtype
        self.schedule, self.shape = None, None

    def _build(self, mb: int, seq: int) -> None:
        c, dev = self.config, self.device
        # requires_grad on the examples is what tells a stage to send/receive gradients for them.
        hidden = torch.empty(mb, seq, c.hidden_size, dtype=self.dtype, device="meta", requires_grad=True)
        grad = torch.empty(mb, seq, c.hidden_size, dtype=self.dtype, device="meta")
        stages = []
        for module, i in zip(self.modules, self.ids):
            x = torch.empty(mb, seq, dtype=torch.long, device="meta") if i == 0 else hidden
            last = i == self.n_chunks - 1
            logits = torch.empty(mb, seq, c.vocab_size, dtype=self.dtype, device="meta", requires_grad=True)
            y = logits if last else hidden
            grads = dict(output_grads=None if last else grad, input_grads=None if i == 0 else grad)
            stages.append(
                PipelineStage(
                    module,
                    i,
                    self.n_chunks,
                    dev,
                    input_args=x,
                    output_args=y,
                    group=self.mesh.pp_group,
                    **grads,
                )
            )
        if len(stages) > 1:
            self.schedule = ScheduleInterleaved1F1B(stages, n_microbatches=self.n_mb, loss_fn=self.loss_fn)
        elif self.n_mb >= self.mesh.parallel.pp:
            self.schedule = Schedule1F1B(stages[0], n_microbatches=self.n_mb, loss_fn=self.loss_fn)
        else:
            self.schedule = ScheduleGPipe(stages[0], n_microbatches=self.n_mb, loss_fn=self.loss_fn)
        self.shape = (mb, seq)

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
        """Forward + backward of this rank's batch (B, S). Returns the mean micro-batch loss on the
        rank that holds the last chunk, None elsewhere."""
        b, s = inputs.shape
        if b % self.n_mb:
            raise ValueError(f"per-rank batch {b} is not divisible by {self.n_mb} pipeline micro-batches")
        if self.shape != (b // self.n_mb, s):
            self._build(b // self.n_mb, s)
        last_here = (self.n_chunks - 1) in self.ids
        losses: list[torch.Tensor] = []
        kwargs = {"target": targets, "losses": losses} if last_here else {}
        if self.mesh.is_first_stage:
            self.schedule.step(inputs, **kwargs)
        else:
            self.schedule.step(**kwargs)
        return torch.stack(losses).mean().detach() if last_here else None
