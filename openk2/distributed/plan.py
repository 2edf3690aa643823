"""`openk2 plan`: per-GPU memory and an estimate of step time and MFU for a parallel layout.

Everything is computed from the config and the layout; the assumptions are printed with the result.

Memory per GPU (the busiest pipeline stage: the most layers, plus the embedding or head):
* weights: bf16 copy of the stage's attention / dense / shared / router parameters, its 1/ep of the
  routed experts;
* gradients: fp32 (accumulated over micro-batches);
* optimizer (ZeRO-1): fp32 master weights + Muon momentum (matrices) or AdamW m, v (the rest),
  sharded over the parameter's replicas: dp x ep ranks for replicated weights, dp for expert slices;
* activations: what autograd saves per token per layer (itemised in `activation_elements`), times the
  tokens of one micro-batch, times the micro-batches in flight on the first stage of 1F1B (pp, a little
  more when interleaved), under four regimes: none of K2's savings, selective recomputation (norms,
  SwiGLU, everything inside MLA), + FP8 storage of the routed experts' inputs, + CPU offload (only
  the micro-batch being worked on stays on the GPU; two, for double buffering).

Step time: model FLOPs (6 x activated parameters + attention, `openk2.model.size`) plus recomputation, at an
assumed matmul efficiency of the GPU's dense bf16 peak, stretched by the pipeline bubble; expert
all-to-all and ZeRO collectives at the assumed link bandwidths, reported both as overlapped (K2 hides
the all-to-all under compute) and exposed. MFU = model FLOPs / (step time x peak).

`measure_activation_bytes` counts the bytes autograd really saves in one forward, which the tests use
to check `activation_elements` on small models.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field

from openk2.config import ModelConfig
from openk2.model.size import count_parameters, flops_per_token

GPUS = {  # dense bf16 peak TFLOPS, HBM GB, NVLink GB/s per GPU (one direction), network GB/s per GPU
    "h800": dict(tflops=989.0, hbm_gb=80.0, nvlink_gbs=200.0, net_gbs=50.0),
    "h100": dict(tflops=989.0, hbm_gb=80.0, nvlink_gbs=450.0, net_gbs=50.0),
    "h200": dict(tflops=989.0, hbm_gb=141.0, nvlink_gbs=450.0, net_gbs=50.0),
    "a100": dict(tflops=312.0, hbm_gb=80.0, nvlink_gbs=300.0, net_gbs=25.0),
}


@dataclass
class Layout:
    nodes: int = 64
    gpus_per_node: int = 8
    pp: int = 16
    ep: int = 16
    virtual_stages: int = 2
    seq_len: int = 4096
    global_batch_tokens: int = 67_108_864  # K2: 67M tokens per step
    micro_batch: int = 1  # sequences per micro-batch

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def dp_ep(self) -> int:
        """Ranks per pipeline stage: all read different data."""
        return self.world // self.pp

    @property
    def dp(self) -> int:
        return self.dp_ep // self.ep

    def validate(self, config: ModelConfig) -> Layout:
        if self.world % self.pp or self.dp_ep % self.ep:
            raise ValueError(f"{self.world} GPUs cannot be split as pp={self.pp} x ep={self.ep} x dp")
        if config.n_routed_experts % self.ep:
            raise ValueError(f"ep={self.ep} does not divide n_routed_experts={config.n_routed_experts}")
        if self.pp * self.virtual_stages > config.num_hidden_layers:
            raise ValueError("more pipeline chunks than layers")
        return self

    def microbatches(self) -> int:
        """Micro-batches per step per pipeline (global batch / (dp x ep) / micro-batch size)."""
        return max(1, self.global_batch_tokens // self.seq_len // self.dp_ep // self.micro_batch)


@dataclass
class Bytes:
    weight: int = 2  # bf16 compute copy
    grad: int = 4  # fp32 accumulation
    master: int = 4  # fp32 master weights (0: train in the weights' own precision)
    state: int = 4  # per optimizer-state element (Muon: 1 buffer, AdamW: 2)
    activation: int = 2


def activation_elements(c: ModelConfig, seq: int, moe: bool, flash: bool = True) -> dict[str, float]:
    """Elements autograd saves per token for one layer, itemised, without any recomputation.
    flash=False adds the (H, S) attention probabilities per token a non-fused kernel keeps."""
    d, h = c.hidden_size, c.num_attention_heads
    q_in = h * c.qk_head_dim
    attn = {
        "norms (inputs + outputs)": 2 * d,
        "q/kv down-projections": (c.q_lora_rank or 0) * 2 + c.kv_cache_dim + c.kv_lora_rank,
        "q, kv up-projections": q_in + h * (c.qk_nope_head_dim + c.v_head_dim),
        "rope'd q, k, v": 2 * q_in + h * c.v_head_dim,
        "attention output": h * c.v_head_dim * (2 if flash else 3),
    }
    if not flash:
        attn["attention probabilities"] = h * seq / 2  # causal: half the row on average
    if moe:
        k, i = c.num_experts_per_tok, c.moe_intermediate_size
        s = c.n_shared_experts * i
        mlp = {
            "mlp norm": 2 * d,
            "router scores": 3 * c.n_routed_experts,
            "expert inputs (k copies)": k * d,
            "expert gate/up outputs": 2 * k * i,
            "expert SwiGLU: silu(gate), product": 2 * k * i,
            "expert outputs (combine)": k * d,
            "shared expert": d + 4 * s,
        }
    else:
        mlp = {"mlp norm": 2 * d, "dense MLP": 4 * c.intermediate_size}
    return {**{"attn: " + k: v for k, v in attn.items()}, **{"mlp: " + k: v for k, v in mlp.items()}}


def saved_per_token(c: ModelConfig, seq: int, moe: bool, recompute: bool, fp8: bool) -> float:
    """Bytes-weighted elements (in units of activation bytes) saved per token per layer."""
    items = activation_elements(c, seq, moe)
    if recompute:  # MLA keeps its input only; norms and SwiGLU outputs are rebuilt
        kept = {
            "mlp: expert inputs (k copies)",
            "mlp: expert gate/up outputs",
            "mlp: expert outputs (combine)",
        }
        total = c.hidden_size * 2  # block input + MLA input
        total += sum(v for k, v in items.items() if k in kept)
        total += c.hidden_size + 3 * c.n_routed_experts if moe else c.hidden_size
    else:
        total = sum(items.values())
    if fp8 and moe:  # expert inputs and SwiGLU inputs in e4m3 (1 byte, 2 for bf16): half the bytes
        total -= 0.5 * (items["mlp: expert inputs (k copies)"] + items["mlp: expert gate/up outputs"])
    return total


@dataclass
class Plan:
    config: ModelConfig
    layout: Layout
    gpu: str = "h800"
    bytes: Bytes = field(default_factory=Bytes)
    matmul_efficiency: float = 0.55  # fraction of dense bf16 peak the matmuls reach
    dispatch_bytes: int = 1  # FP8 dispatch, bf16 combine (DeepSeek-V3 practice)

    # ------------------------------------------------------------------ parameters per GPU
    def stage_params(self) -> dict[str, float]:
        """Parameters on the busiest GPU: replicated (over dp x ep) and expert (over dp)."""
        c, lay = self.config, self.layout
        p = count_parameters(c)
        n_moe = sum(c.is_moe_layer(i) for i in range(c.num_hidden_layers))
        layers = math.ceil(c.num_hidden_layers / (lay.pp * lay.virtual_stages)) * lay.virtual_stages
        per_layer_rep = (p.attention + p.norms) / c.num_hidden_layers
        per_moe_rep = (p.shared_experts + p.router) / max(n_moe, 1)
        per_moe_expert = p.routed_experts / max(n_moe, 1) / lay.ep
        moe_frac = n_moe / c.num_hidden_layers
        replicated = layers * (per_layer_rep + moe_frac * per_moe_rep) + p.embedding / 2  # + embed or head
        replicated += layers * (1 - moe_frac) * (p.dense_mlp / max(c.num_hidden_layers - n_moe, 1))
        return {"replicated": replicated, "expert": layers * moe_frac * per_moe_expert, "layers": layers}

    def memory(self) -> dict[str, float]:
        c, lay, b = self.config, self.layout, self.bytes
        sp = self.stage_params()
        params = sp["replicated"] + sp["expert"]
        p = count_parameters(c)
        adam_frac = (p.embedding + p.norms) / p.total  # AdamW parameters: two state elements
        opt_per_param = b.master + b.state * (1 + adam_frac)
        optimizer = opt_per_param * (sp["replicated"] / lay.dp_ep + sp["expert"] / lay.dp)
        tokens = lay.micro_batch * lay.seq_len
        moe_frac = sum(c.is_moe_layer(i) for i in range(c.num_hidden_layers)) / c.num_hidden_layers
        in_flight = lay.pp * (1 + (lay.pp - 1) / (lay.pp * lay.virtual_stages)) / lay.virtual_stages
        in_flight = min(in_flight, lay.microbatches() * 1.0)

        def act(recompute: bool, fp8: bool, offload: bool) -> float:
            per_tok = moe_frac * saved_per_token(c, lay.seq_len, True, recompute, fp8)
            per_tok += (1 - moe_frac) * saved_per_token(c, lay.seq_len, False, recompute, fp8)
            chunks = min(in_flight, 2.0) if offload else in_flight
            return per_tok * b.activation * tokens * sp["layers"] / lay.virtual_stages * chunks

        return {
            "weights": params * b.weight,
            "gradients": params * b.grad,
            "optimizer (ZeRO-1)": optimizer,
            "activations, none": act(False, False, False),
            "activations, recompute": act(True, False, False),
            "activations, recompute + fp8": act(True, True, False),
            "activations, recompute + fp8 + offload": act(True, True, True),
        }

    # ------------------------------------------------------------------ time
    def step_time(self) -> dict[str, float]:
        c, lay = self.config, self.layout
        g = GPUS[self.gpu]
        peak = g["tflops"] * 1e12
        tokens_gpu = lay.global_batch_tokens / lay.dp_ep  # tokens each pipeline processes
        fl = flops_per_token(c, context=lay.seq_len // 2)  # causal: average context is half
        model_flops = fl["train"] * lay.global_batch_tokens / lay.world
        recompute_flops = 0.1 * fl["forward"] * lay.global_batch_tokens / lay.world  # norms, SwiGLU, MLA
        compute = (model_flops + recompute_flops) / (peak * self.matmul_efficiency)
        m = lay.microbatches()
        bubble = (lay.pp - 1) / (lay.virtual_stages * m)
        # Expert all-to-all: per MoE layer, each token's k copies go out (fp8) and come back (bf16),
        # forward and backward; (ep - 1)/ep leave the GPU, the part beyond one node over the network.
        n_moe_stage = (
            self.stage_params()["layers"]
            * sum(c.is_moe_layer(i) for i in range(c.num_hidden_layers))
            / c.num_hidden_layers
        )
        per_tok = c.num_experts_per_tok * c.hidden_size * (self.dispatch_bytes + 2) * 2
        a2a_bytes = tokens_gpu * n_moe_stage * per_tok * (lay.ep - 1) / lay.ep
        off_node = max(0.0, 1 - lay.gpus_per_node / lay.ep) if lay.ep > 1 else 0.0
        a2a = a2a_bytes * off_node / (g["net_gbs"] * 1e9) + a2a_bytes * (1 - off_node) / (
            g["nvlink_gbs"] * 1e9
        )
        sp = self.stage_params()
        zero_bytes = (sp["replicated"] + sp["expert"]) * (self.bytes.grad + self.bytes.weight)
        zero = zero_bytes / (g["net_gbs"] * 1e9)
        overlapped = compute * (1 + bubble) + zero
        exposed = overlapped + a2a
        return {
            "model TFLOPs per GPU": model_flops / 1e12,
            "compute (s)": compute,
            "pipeline bubble": bubble,
            "all-to-all (s)": a2a,
            "ZeRO reduce-scatter + all-gather (s)": zero,
            "step, all-to-all overlapped (s)": overlapped,
            "step, all-to-all exposed (s)": exposed,
            "MFU, overlapped": model_flops / (overlapped * peak),
            "MFU, exposed": model_flops / (exposed * peak),
            "tokens/s (cluster), overlapped": lay.global_batch_tokens / overlapped,
        }


def measure_activation_bytes(model, inputs, params=()) -> int:
    """Bytes autograd saves in one forward `model(inputs)`, each storage counted once; the storages of
    `params` (weights, and views of them such as a transposed expert slice) are not activations."""
    import torch

    seen = {p.untyped_storage().data_ptr() for p in params}
    total = [0]

    def pack(t: torch.Tensor):
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total[0] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(inputs)
    return total[0]


# ---------------------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="kimi-k2")
    p.add_argument("--config", help="a checkpoint directory or config.json instead of a preset")
    p.add_argument("--nodes", type=int, default=64)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu", default="h800", choices=sorted(GPUS))
    p.add_argument("--pp", type=int, default=16)
    p.add_argument("--ep", type=int, default=16)
    p.add_argument("--virtual-stages", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--global-batch-tokens", type=int, default=67_108_864)
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per micro-batch")
    p.add_argument("--matmul-efficiency", type=float, default=0.55)


def run(args: argparse.Namespace) -> int:
    c = ModelConfig.from_pretrained(args.config) if args.config else ModelConfig.from_preset(args.preset)
    lay = Layout(
        args.nodes, args.gpus_per_node, args.pp, args.ep, args.virtual_stages, args.seq_len,
        args.global_batch_tokens, args.micro_batch,
    )  # fmt: skip
    try:
        lay.validate(c)
    except ValueError as e:
        print(f"error: {e}")
        return 2
    plan = Plan(c, lay, args.gpu, matmul_efficiency=args.matmul_efficiency)
    g = GPUS[args.gpu]
    gb = 1e9
    print(
        f"{args.config or args.preset}: {lay.world} x {args.gpu} = {lay.nodes} nodes x {lay.gpus_per_node};"
        f" pp={lay.pp} (x{lay.virtual_stages} virtual) ep={lay.ep} dp={lay.dp}"
        f" (dp x ep = {lay.dp_ep} per stage)"
    )
    sp = plan.stage_params()
    print(
        f"busiest GPU: {sp['layers']} layers, {sp['replicated'] / 1e9:.2f}B replicated + "
        f"{sp['expert'] / 1e9:.2f}B expert parameters; {lay.microbatches()} micro-batches of "
        f"{lay.micro_batch} x {lay.seq_len} tokens per step"
    )
    mem = plan.memory()
    static = mem["weights"] + mem["gradients"] + mem["optimizer (ZeRO-1)"]
    print("\nmemory per GPU (GB)")
    for k in ("weights", "gradients", "optimizer (ZeRO-1)"):
        print(f"  {k:<42} {mem[k] / gb:8.1f}")
    for k, v in mem.items():
        if k.startswith("activations"):
            total = static + v
            fits = "fits" if total <= g["hbm_gb"] * gb * 0.95 else "does NOT fit"
            print(f"  {k:<42} {v / gb:8.1f}   total {total / gb:7.1f}  {fits} in {g['hbm_gb']:.0f} GB")
    print("\nstep time estimate")
    for k, v in plan.step_time().items():
        print(f"  {k:<42} {v:10.3f}" if v < 1e4 else f"  {k:<42} {v:10.3g}")
    b = plan.bytes
    print(
        "\nassumptions: weights bf16, gradients fp32, fp32 master + Muon momentum / AdamW m,v sharded over "
        f"replicas (ZeRO-1); activations bf16, first stage holds ~pp micro-batches (1F1B); "
        f"{int(plan.matmul_efficiency * 100)}% of {g['tflops']:.0f} TFLOPS dense bf16; recomputation costs "
        f"~10% of a forward; links {g['nvlink_gbs']:.0f} GB/s NVLink, {g['net_gbs']:.0f} GB/s network per "
        f"GPU; dispatch fp8, combine bf16; 5% of HBM reserved (fragmentation, buffers). Bytes: {b}"
    )
    return 0
