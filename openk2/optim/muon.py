"""MuonClip: Muon for every weight matrix, AdamW for the rest, QK-Clip after each step.

Muon (Keller Jordan et al.) replaces a matrix's update by the nearest semi-orthogonal matrix to its
momentum, computed by a few Newton-Schulz iterations. K2's version (Moonlight recipe) then rescales
the update by 0.2 * sqrt(max(n, m)) so its RMS matches a typical AdamW update (~0.2), which lets one
learning rate and weight decay serve both parameter kinds. Per matrix W (n x m):

    M_t = mu M_{t-1} + G_t
    O_t = NewtonSchulz5(G_t + mu M_t  (Nesterov)  or  M_t) * 0.2 * sqrt(max(n, m))
    W_t = W_{t-1} - lr (O_t + lambda W_{t-1})

Parameter split (`split_parameters`): every parameter with two or more dims gets Muon except the
token embedding and the LM head (their rows are looked up or scored one token at a time, so an
orthogonalised update is the wrong geometry); that includes the router matrix `mlp.gate.weight`, as
K2 applies Muon to every matrix but those two. Stacked expert weights (E, out, in) are E separate
matrices: Newton-Schulz runs batched over the leading dim, and further batches every matrix of the
same shape into one call. Norm weights, biases, embeddings and the head get AdamW (no weight decay on
1-D parameters). The router's `e_score_correction_bias` is a buffer, moved by `optim.balance`.

`newton_schulz`, `newton_schulz_by_shape`, `muon_update` and `muon_updates` are pure functions so
that distributed Muon (ZeRO-1) can run them on gathered full matrices; the optimizer class is a
thin layer of state and parameter groups around them.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
UPDATE_RMS = 0.2


def resolve_ns_dtype(ns_dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype | None:
    """The Newton-Schulz precision to use on `device`. "auto": bf16, as K2, where matmuls run natively
    in bf16 (a GPU, or a CPU with AMX or AVX512-BF16); float32 on other CPUs (an AVX2 laptop), where
    a bf16 matmul is emulated and tens of times slower than fp32. A name ("bfloat16", "float32") or a
    dtype is taken as given; None computes in the parameters' dtype."""
    if ns_dtype != "auto":
        return getattr(torch, ns_dtype) if isinstance(ns_dtype, str) else ns_dtype
    if device.type != "cpu":
        return torch.bfloat16
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # private, hence getattr
    native = any(getattr(torch.cpu, check, lambda: False)() for check in checks)
    return torch.bfloat16 if native else torch.float32


def newton_schulz(G: torch.Tensor, steps: int = 5, eps: float = 1e-7, dtype: torch.dtype | None = None):
    """Approximately orthogonalise each matrix of G (..., n, m): U S V^T -> U S' V^T with S' ~ 1.

    The quintic X <- aX + (bA + cA^2)X, A = XX^T, with K2's coefficients pushes every singular value
    of X / ||X||_F into roughly [0.7, 1.2] in five steps (it trades exactness for speed: the
    coefficients maximise the slope at zero). Tall matrices are transposed so A is the small Gram
    matrix. Runs in `dtype` (default: G's); bf16 is fine, which is the point of the iteration.
    Returns a tensor of G's dtype and shape.
    """
    if G.ndim < 2:
        raise ValueError(f"newton_schulz needs a matrix or a batch of matrices, got shape {tuple(G.shape)}")
    a, b, c = NS_COEFFICIENTS
    X = G.to(dtype or G.dtype)
    tall = X.shape[-2] > X.shape[-1]
    if tall:
        X = X.mT
    batch = X.shape[:-2]
    X = X.reshape(-1, *X.shape[-2:])  # one (batch, m, n) chain of bmm's, batch 1 for a plain matrix
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        A = torch.bmm(X, X.mT)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b A + c A A in one call
        X = torch.baddbmm(X, B, X, beta=a)  # a X + B X
    X = X.reshape(*batch, *X.shape[-2:])
    if tall:
        X = X.mT
    return X.to(G.dtype)


def muon_scale(shape: torch.Size | tuple[int, ...]) -> float:
    """0.2 * sqrt(max(n, m)): an orthogonal n x m update has RMS 1/sqrt(max(n, m)); this makes it 0.2."""
    return UPDATE_RMS * math.sqrt(max(shape[-2], shape[-1]))


def momentum_direction(grad: torch.Tensor, buf: torch.Tensor, beta: float, nesterov: bool) -> torch.Tensor:
    """Update the momentum buffer in place (M = beta M + G) and return the direction to orthogonalise."""
    buf.mul_(beta).add_(grad)
    return grad.add(buf, alpha=beta) if nesterov else buf.clone()


def muon_update(
    grad: torch.Tensor,
    momentum_buffer: torch.Tensor,
    beta: float = 0.95,
    nesterov: bool = True,
    ns_steps: int = 5,
    ns_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """One matrix's (or a batch of matrices') Muon update, RMS-matched; momentum_buffer is updated in
    place. The caller applies W -= lr * (update + wd * W)."""
    direction = momentum_direction(grad, momentum_buffer, beta, nesterov)
    return newton_schulz(direction, ns_steps, dtype=ns_dtype) * muon_scale(grad.shape)


def newton_schulz_by_shape(
    matrices: list[torch.Tensor], steps: int = 5, dtype: torch.dtype | None = None
) -> list[torch.Tensor]:
    """`newton_schulz` of every tensor in `matrices` (each a matrix or a stack of matrices), with all
    matrices of one shape, dtype and device stacked into one batched call: one bmm chain per shape
    instead of one per matrix, so a model's many small matrices make a few large matmuls. Returns
    the results in the input order, each of its input's shape; equal to calling `newton_schulz` on
    each (tested). Pure: the inputs are not modified."""
    buckets: dict[tuple, list[int]] = defaultdict(list)
    for i, m in enumerate(matrices):
        buckets[(tuple(m.shape[-2:]), m.dtype, m.device)].append(i)
    out: list[torch.Tensor | None] = [None] * len(matrices)
    for (shape, _, _), members in buckets.items():
        flat = [matrices[i].reshape(-1, *shape) for i in members]
        stacked = flat[0] if len(flat) == 1 else torch.cat(flat)
        ortho = newton_schulz(stacked, steps, dtype=dtype)
        for i, o in zip(members, ortho.split([f.shape[0] for f in flat])):
            out[i] = o.view(matrices[i].shape)
    return out  # type: ignore[return-value]


def muon_updates(
    grads: list[torch.Tensor],
    momentum_buffers: list[torch.Tensor],
    beta: float = 0.95,
    nesterov: bool = True,
    ns_steps: int = 5,
    ns_dtype: torch.dtype | None = None,
) -> list[torch.Tensor]:
    """`muon_update` of many matrices at once, Newton-Schulz batched by shape
    (`newton_schulz_by_shape`); every momentum buffer is updated in place. What MuonClip's step
    runs; the caller applies W -= lr * (update + wd * W)."""
    directions = [momentum_direction(g, m, beta, nesterov) for g, m in zip(grads, momentum_buffers)]
    ortho = newton_schulz_by_shape(directions, ns_steps, ns_dtype)
    return [o * muon_scale(g.shape) for o, g in zip(ortho, grads)]


# ---------------------------------------------------------------------------------------------------
# Parameter split


@dataclass
class ParameterSplit:
    muon: list[tuple[str, nn.Parameter]]
    adamw: list[tuple[str, nn.Parameter]]


ADAMW_MATRICES = ("embed_tokens.weight", "lm_head.weight")


def split_parameters(model: nn.Module) -> ParameterSplit:
    """Muon for every trainable matrix (and stacked matrices) except embeddings and the LM head."""
    muon, adamw, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:  # tied weights appear once
            continue
        seen.add(id(p))
        if p.ndim >= 2 and not name.endswith(ADAMW_MATRICES):
            muon.append((name, p))
        else:
            adamw.append((name, p))
    return ParameterSplit(muon, adamw)


# ---------------------------------------------------------------------------------------------------
# The optimizer


class MuonClip(torch.optim.Optimizer):
    """Muon + AdamW in one torch optimizer (one state_dict, one set of param groups for schedules).

    Every group's `lr` is the learning rate; a scheduler scales all of them together. `step()` also
    applies QK-Clip when `qk_clip_tau` is set and the model recorded max logits in its last forward
    (`model.record_stats(True)`), and returns the number of heads it clipped (0 when none).
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 2e-4,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        qk_clip_tau: float | None = 100.0,
        ns_steps: int = 5,
        ns_dtype: torch.dtype | str | None = "auto",
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        adamw_lr: float | None = None,
    ):
        if lr <= 0:
            raise ValueError(f"learning rate must be positive, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if qk_clip_tau is not None and qk_clip_tau <= 0:
            raise ValueError(f"qk_clip_tau must be positive or None, got {qk_clip_tau}")
        split = split_parameters(model)
        adamw_decay = [p for n, p in split.adamw if p.ndim >= 2]
        adamw_no_decay = [p for n, p in split.adamw if p.ndim < 2]
        adam_lr = lr if adamw_lr is None else adamw_lr
        groups = [
            dict(params=[p for _, p in split.muon], use_muon=True, lr=lr, weight_decay=weight_decay),
            dict(params=adamw_decay, use_muon=False, lr=adam_lr, weight_decay=weight_decay),
            dict(params=adamw_no_decay, use_muon=False, lr=adam_lr, weight_decay=0.0),
        ]
        groups = [g for g in groups if g["params"]]
        defaults = dict(
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            betas=adamw_betas,
            eps=adamw_eps,
        )
        super().__init__(groups, defaults)
        self.model = model
        self.qk_clip_tau = qk_clip_tau
        # Newton-Schulz precision: bf16 as in K2 where the hardware has bf16 units (resolve_ns_dtype)
        self.ns_dtype = resolve_ns_dtype(ns_dtype, next(model.parameters()).device)
        self.last_clipped: dict[int, int] = {}
        self.names = {id(p): n for n, p in split.muon + split.adamw}

    @torch.no_grad()
    def step(self, closure=None, max_logits: dict[int, torch.Tensor] | None = None) -> int:
        """One update of every parameter, then QK-Clip from `max_logits` (layer -> (H,), the step's
        maxima) or, when None, from the model's last recorded forward. Returns heads clipped."""
        if closure is not None:
            with torch.enable_grad():
                closure()
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon_group(group)
            else:
                self._adamw_group(group)
        if self.qk_clip_tau is None:
            return 0
        from openk2.optim.qk_clip import qk_clip_

        self.last_clipped = {}
        return qk_clip_(self.model, self.qk_clip_tau, max_logits, per_layer=self.last_clipped)

    def _muon_group(self, group: dict) -> None:
        lr, wd = group["lr"], group["weight_decay"]
        params = [p for p in group["params"] if p.grad is not None]
        for p in params:
            if p.grad.is_sparse:
                raise RuntimeError("MuonClip does not support sparse gradients")
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        # every matrix of one shape in one Newton-Schulz call: a layer's stacked experts are already
        # one (E, out, in) tensor; same-shaped matrices of different layers join them
        buffers = [self.state[p]["momentum_buffer"] for p in params]
        updates = muon_updates([p.grad for p in params], buffers, group["momentum"], group["nesterov"],
                               group["ns_steps"], self.ns_dtype)  # fmt: skip
        for p, u in zip(params, updates):
            p.mul_(1 - lr * wd)
            p.add_(u, alpha=-lr)

    def _adamw_group(self, group: dict) -> None:
        lr, wd, (beta1, beta2), eps = group["lr"], group["weight_decay"], group["betas"], group["eps"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            t = state["step"]
            state["exp_avg"].lerp_(p.grad, 1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            denom = (state["exp_avg_sq"] / (1 - beta2**t)).sqrt_().add_(eps)
            p.mul_(1 - lr * wd)
            p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1**t))
