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

Step time on the busiest GPU, one cost at a time (`Plan.costs`), each from its own efficiency input
(`Efficiency`: the fraction of the hardware peak that kind of work reaches):
* matmuls (projections, experts with their load imbalance, LM head and MTP on the last stage, whose
  layer count is chosen to balance the stages) at the matmul dtype's peak; the attention core at the
  bf16 peak; bandwidth-bound kernels (norms, SwiGLU, rotary, softmax) at HBM bandwidth;
* the pipeline bubble of interleaved 1F1B, the pipeline's point-to-point sends, the expert all-to-all
  (per remote node a token routes to, over the network; in-node copies over NVLink), ZeRO-1
  collectives, the optimizer (Muon's Newton-Schulz FLOPs and its gather/scatter, or AdamW's pass over
  its state) and CPU activation offload over PCIe.
The step is reported with everything in series and with the all-to-all, point-to-point and offload
hidden under compute (K2 and DeepSeek-V3 overlap them). The efficiency defaults are calibrated on
DeepSeek-V3's published run: 2048 H800 at PP16 / EP64 with FP8 GEMMs took 180K GPU-hours per
trillion tokens, and the planner predicts it within 15% (tested).

`measure_activation_bytes` counts the bytes autograd really saves in one forward, which the tests use
to check `activation_elements` on small models.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field, fields

from openk2.config import ModelConfig
from openk2.model.size import count_parameters, flops_per_token

# Per GPU: dense bf16 and fp8 peak TFLOP/s, HBM GB and TB/s, NVLink GB/s (one direction), network
# GB/s (one 400 Gb/s NIC per GPU), host PCIe GB/s (Gen5 x16 one direction; Gen4 for the A100).
GPUS = {
    "h800": dict(tflops=989.0, fp8_tflops=1979.0, hbm_gb=80.0, hbm_tbs=3.35, nvlink_gbs=200.0,
                 net_gbs=50.0, pcie_gbs=64.0),
    "h100": dict(tflops=989.0, fp8_tflops=1979.0, hbm_gb=80.0, hbm_tbs=3.35, nvlink_gbs=450.0,
                 net_gbs=50.0, pcie_gbs=64.0),
    "h200": dict(tflops=989.0, fp8_tflops=1979.0, hbm_gb=141.0, hbm_tbs=4.8, nvlink_gbs=450.0,
                 net_gbs=50.0, pcie_gbs=64.0),
    "a100": dict(tflops=312.0, fp8_tflops=312.0, hbm_gb=80.0, hbm_tbs=2.0, nvlink_gbs=300.0,
                 net_gbs=25.0, pcie_gbs=32.0),
}  # fmt: skip
RECOMPUTE_FRACTION = 0.1  # selective recomputation (norms, SwiGLU, MLA up-projections): ~10% of a forward


@dataclass
class Efficiency:
    """Fractions of the hardware's peak each kind of work reaches: the planner's inputs.

    The defaults are calibrated on DeepSeek-V3's published run (2048 H800, PP16, EP64, FP8 GEMMs:
    180K GPU-hours per trillion tokens; `tests/test_distributed_plan.py`), within what public
    kernel benchmarks report for each kind of work."""

    matmul: float = 0.35  # dense and grouped GEMMs, of the matmul dtype's peak
    attention: float = 0.35  # the attention core (flash-style forward + backward), of the bf16 peak
    memory: float = 0.6  # bandwidth-bound kernels (norms, SwiGLU, rotary, softmax, AdamW), of HBM
    all_to_all: float = 0.6  # network collectives, of the link bandwidth
    p2p: float = 0.8  # pipeline sends, of the link bandwidth
    optimizer: float = 0.5  # Newton-Schulz matmuls, of the bf16 peak
    offload: float = 0.8  # activation offload, of the PCIe bandwidth
    expert_imbalance: float = 1.1  # the busiest expert rank's load over the mean

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            flag = f"--eff-{f.name.replace('_', '-')}"
            if f.name == "expert_imbalance":
                if not 1 <= value < float("inf"):
                    raise ValueError(f"{flag} is a load ratio >= 1, got {value}")
            elif not 0 < value <= 1:
                raise ValueError(f"{flag} is a fraction of peak in (0, 1], got {value}")


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
    efficiency: Efficiency = field(default_factory=Efficiency)
    matmul_dtype: str = "bf16"  # "fp8": GEMMs at the fp8 peak (DeepSeek-V3's FP8 training)
    optimizer: str = "muon"  # or "adamw"
    offload: bool = True  # CPU activation offload (K2); its PCIe traffic is costed
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
    def stage_flops(self) -> dict[str, float]:
        """Forward FLOPs per token on the busiest pipeline stage, split by the kind of work.

        The last stage also holds the LM head and the multi-token-prediction modules, so it gets
        fewer layers: the placement is the one that minimises the busiest stage, and what remains
        is reported as `imbalance` (busiest stage over the mean)."""
        c, lay = self.config, self.layout
        p = count_parameters(c)
        d, n_layers = c.hidden_size, c.num_hidden_layers
        n_moe = sum(c.is_moe_layer(i) for i in range(n_layers))
        attn_proj = 2 * p.attention / n_layers
        ctx = lay.seq_len / 2  # causal: the average token attends to half the sequence
        attn_core = 2 * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim) * ctx
        expert = 3 * d * c.moe_intermediate_size
        routed = 2 * c.num_experts_per_tok * expert
        moe_rest = 2 * (c.n_shared_experts * expert + c.n_routed_experts * d)
        dense = 2 * 3 * d * c.intermediate_size
        moe_frac = n_moe / n_layers
        head = 2 * c.vocab_size * d
        mtp = c.num_nextn_predict_layers * (attn_proj + moe_rest + routed + 2 * 2 * d * d + head)
        mtp_core = c.num_nextn_predict_layers * attn_core

        def layers(k: float) -> dict[str, float]:
            return {
                "matmul": k * (attn_proj + moe_frac * moe_rest + (1 - moe_frac) * dense),
                "experts": k * moe_frac * routed,
                "attention": k * attn_core,
            }

        def placement(k: int) -> dict[str, float]:  # k layers on the last stage, the rest spread
            last = layers(k)
            last["matmul"] += head + mtp
            last["attention"] += mtp_core
            if lay.pp == 1:
                return last
            full = layers(math.ceil((n_layers - k) / (lay.pp - 1)))
            return max((full, last), key=lambda f: sum(f.values()))

        last_layers = range(0, math.ceil(n_layers / lay.pp) + 1) if lay.pp > 1 else [n_layers]
        busiest = min((placement(k) for k in last_layers), key=lambda f: sum(f.values()))
        mean = {k: v * n_layers / lay.pp for k, v in layers(1).items()}
        mean["matmul"] += (head + mtp) / lay.pp
        mean["attention"] += mtp_core / lay.pp
        return {**busiest, "imbalance": sum(busiest.values()) / sum(mean.values())}

    def costs(self) -> dict[str, float]:
        """Seconds per training step on the busiest GPU, one entry per kind of cost."""
        c, lay, eff = self.config, self.layout, self.efficiency
        g = GPUS[self.gpu]
        bf16 = g["tflops"] * 1e12
        matmul_peak = g["fp8_tflops" if self.matmul_dtype == "fp8" else "tflops"] * 1e12
        tokens = lay.global_batch_tokens / lay.dp_ep  # tokens through each pipeline per step
        f = self.stage_flops()
        recompute = 1 + RECOMPUTE_FRACTION / 3  # backward is 2x forward; recompute adds part of one
        matmul = 3 * recompute * tokens * (f["matmul"] + f["experts"] * eff.expert_imbalance)
        matmul /= matmul_peak * eff.matmul
        attention = 3 * recompute * tokens * f["attention"] / (bf16 * eff.attention)
        # Norms, SwiGLU, rotary, softmax, residuals: bandwidth-bound; each saved activation is written
        # in the forward and read, with its gradient written, in the backward (~3 passes).
        sp = self.stage_params()
        moe_frac = sum(c.is_moe_layer(i) for i in range(c.num_hidden_layers)) / c.num_hidden_layers
        per_layer = moe_frac * sum(activation_elements(c, lay.seq_len, True).values())
        per_layer += (1 - moe_frac) * sum(activation_elements(c, lay.seq_len, False).values())
        elementwise_bytes = 3 * self.bytes.activation * per_layer * sp["layers"] * tokens
        elementwise = elementwise_bytes / (g["hbm_tbs"] * 1e12 * eff.memory)
        compute = matmul + attention + elementwise
        bubble = (lay.pp - 1) / (lay.virtual_stages * lay.microbatches()) * compute
        # Pipeline point-to-point: each token's hidden state forward and its gradient backward, across
        # every chunk boundary this GPU owns (virtual stages multiply them); over the network.
        p2p_bytes = tokens * c.hidden_size * self.bytes.activation * 2 * lay.virtual_stages
        p2p = p2p_bytes / (g["net_gbs"] * 1e9 * eff.p2p) if lay.pp > 1 else 0.0
        # Expert all-to-all: per MoE layer each token's copies go out (dispatch dtype) and come back
        # (bf16), forward and backward. Inside a node all k copies travel over NVLink; across nodes a
        # token is sent once per remote node it routes to, which group-limited routing (DeepSeek-V3:
        # at most topk_group of the n_group node groups) caps below k.
        n_moe_stage = sp["layers"] * moe_frac
        per_copy = c.hidden_size * (self.dispatch_bytes + 2) * 2 * tokens * n_moe_stage * eff.expert_imbalance
        k = c.num_experts_per_tok
        ep_nodes = max(1, lay.ep // lay.gpus_per_node)
        remote = (ep_nodes - 1) / ep_nodes
        nodes_per_token = min(k, c.topk_group if c.n_group > 1 else k, ep_nodes)
        network_bytes = per_copy * nodes_per_token * remote
        nvlink_bytes = per_copy * k * (min(lay.ep, lay.gpus_per_node) - 1) / lay.ep if lay.ep > 1 else 0.0
        a2a = network_bytes / (g["net_gbs"] * 1e9 * eff.all_to_all)
        a2a += nvlink_bytes / (g["nvlink_gbs"] * 1e9 * eff.all_to_all)
        # ZeRO-1: gradients reduce-scattered (fp32) and updated weights all-gathered (bf16).
        zero_bytes = (sp["replicated"] + sp["expert"]) * (self.bytes.grad + self.bytes.weight)
        zero = zero_bytes / (g["net_gbs"] * 1e9 * eff.all_to_all)
        optimizer = self.optimizer_seconds()
        offload = 0.0
        if self.offload:  # every saved activation goes to host memory and comes back (PCIe, each way)
            saved = moe_frac * saved_per_token(c, lay.seq_len, True, recompute=True, fp8=True)
            saved += (1 - moe_frac) * saved_per_token(c, lay.seq_len, False, recompute=True, fp8=True)
            offload_bytes = saved * self.bytes.activation * sp["layers"] * tokens
            offload = offload_bytes / (g["pcie_gbs"] * 1e9 * eff.offload)
        return {
            "matmuls": matmul,
            "attention": attention,
            "elementwise (memory-bound)": elementwise,
            "pipeline bubble": bubble,
            "pipeline point-to-point": p2p,
            "expert all-to-all": a2a,
            "activation offload (PCIe)": offload,
            "ZeRO reduce-scatter + all-gather": zero,
            "optimizer": optimizer,
        }

    def optimizer_seconds(self) -> float:
        """The optimizer step on the busiest GPU. Muon: each rank orthogonalises its share of the
        matrices (5 Newton-Schulz iterations of ~4mn·m + 2m^3 FLOPs each, m <= n) after gathering them
        whole (bf16 out and back); AdamW: a bandwidth-bound pass over its fp32 state shard."""
        c, lay, eff = self.config, self.layout, self.efficiency
        g = GPUS[self.gpu]
        sp = self.stage_params()
        if self.optimizer == "adamw":
            shard = sp["replicated"] / lay.dp_ep + sp["expert"] / lay.dp
            return shard * 4 * 7 / (g["hbm_tbs"] * 1e12 * eff.memory)  # read p, g, m, v; write p, m, v
        d, i = c.hidden_size, c.moe_intermediate_size

        def ns(m: int, n: int) -> float:
            m, n = min(m, n), max(m, n)
            return 5 * (4 * m * m * n + 2 * m**3)

        moe_frac = sum(c.is_moe_layer(k) for k in range(c.num_hidden_layers)) / c.num_hidden_layers
        # The stage's expert matrices are spread over its dp x ep ranks; so are its replicated
        # matrices (attention, shared experts, dense MLP), counted as d x (params / d) blocks.
        expert_flops = 3 * ns(d, i) * c.n_routed_experts * moe_frac * sp["layers"] / lay.dp_ep
        replicated_flops = 5 * 6 * d * sp["replicated"] / lay.dp_ep
        flops = expert_flops + replicated_flops
        gathered = (sp["expert"] * lay.ep + sp["replicated"]) / lay.dp_ep * self.bytes.weight * 2
        network = gathered / (g["net_gbs"] * 1e9 * eff.all_to_all)
        return flops / (g["tflops"] * 1e12 * eff.optimizer) + network

    def step_time(self) -> dict[str, float]:
        """The step on the busiest GPU, communication exposed or hidden under compute (K2 and
        DeepSeek-V3 overlap the all-to-all and pipeline traffic with computation of other
        micro-batches; offload runs on PCIe beside it), and what follows from it."""
        c, lay = self.config, self.layout
        peak = GPUS[self.gpu]["tflops"] * 1e12
        t = self.costs()
        compute = t["matmuls"] + t["attention"] + t["elementwise (memory-bound)"]
        serial = compute + t["pipeline bubble"] + t["ZeRO reduce-scatter + all-gather"] + t["optimizer"]
        hideable = t["expert all-to-all"] + t["pipeline point-to-point"]
        exposed = serial + hideable + t["activation offload (PCIe)"]
        overlapped = (
            serial + max(0.0, hideable - compute) + max(0.0, t["activation offload (PCIe)"] - compute)
        )
        model_flops = (
            flops_per_token(c, context=lay.seq_len // 2)["train"] * lay.global_batch_tokens / lay.world
        )
        tps = lay.global_batch_tokens / overlapped
        return {
            "model TFLOPs per GPU": model_flops / 1e12,
            "step, overlapped (s)": overlapped,
            "step, exposed (s)": exposed,
            "MFU, overlapped": model_flops / (overlapped * peak),
            "MFU, exposed": model_flops / (exposed * peak),
            "tokens/s (cluster), overlapped": tps,
            "GPU-hours per trillion tokens": 1e12 / tps * lay.world / 3600,
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
    p.add_argument("--matmul-dtype", choices=["bf16", "fp8"], default="bf16")
    p.add_argument("--optimizer", choices=["muon", "adamw"], default="muon")
    p.add_argument("--no-offload", dest="offload", action="store_false", help="no CPU activation offload")
    for f in fields(Efficiency):
        p.add_argument(
            f"--eff-{f.name.replace('_', '-')}", type=float, default=f.default, dest=f"eff_{f.name}",
            help=f"efficiency input: {f.name} (default {f.default})",
        )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    c = ModelConfig.from_pretrained(args.config) if args.config else ModelConfig.from_preset(args.preset)
    lay = Layout(
        args.nodes, args.gpus_per_node, args.pp, args.ep, args.virtual_stages, args.seq_len,
        args.global_batch_tokens, args.micro_batch,
    )  # fmt: skip
    try:
        lay.validate(c)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    eff = Efficiency(**{f.name: getattr(args, f"eff_{f.name}") for f in fields(Efficiency)})
    plan = Plan(c, lay, args.gpu, efficiency=eff, matmul_dtype=args.matmul_dtype,
                optimizer=args.optimizer, offload=args.offload)  # fmt: skip
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
    costs, t = plan.costs(), plan.step_time()
    exposed = t["step, exposed (s)"]
    print("\nstep time on the busiest GPU: what each cost contributes")
    print(f"  {'cost':<42} {'seconds':>9} {'% of serial sum':>16}")
    for k, v in costs.items():
        print(f"  {k:<42} {v:9.2f} {100 * v / exposed:15.1f}%")
    print(f"  {'stage imbalance (busiest / mean stage)':<42} {plan.stage_flops()['imbalance']:9.2f}x")
    print(f"  {'step, all of the above in series':<42} {exposed:9.2f} s")
    print(f"  {'step, communication hidden under compute':<42} {t['step, overlapped (s)']:9.2f} s")
    print(f"  {'model TFLOP per GPU per step':<42} {t['model TFLOPs per GPU']:9.1f} TFLOP")
    print(f"  {'MFU (hidden / in series)':<42} {100 * t['MFU, overlapped']:8.1f}% / "
          f"{100 * t['MFU, exposed']:.1f}% of {g['tflops']:.0f} TFLOP/s bf16")  # fmt: skip
    print(f"  {'tokens/s, whole cluster (hidden)':<42} {t['tokens/s (cluster), overlapped']:9.3g}")
    print(f"  {'GPU-hours per trillion tokens (hidden)':<42} {t['GPU-hours per trillion tokens']:9.3g}")
    b = plan.bytes
    print(
        f"\nassumptions: weights bf16, gradients fp32, fp32 master + {args.optimizer} state sharded over "
        f"replicas (ZeRO-1); activations bf16, first stage holds ~pp micro-batches (1F1B); GEMMs in "
        f"{args.matmul_dtype}; recomputation ~{int(RECOMPUTE_FRACTION * 100)}% of a forward; links "
        f"{g['nvlink_gbs']:.0f} GB/s NVLink, {g['net_gbs']:.0f} GB/s network, {g['pcie_gbs']:.0f} GB/s PCIe "
        f"per GPU; dispatch fp8, combine bf16; 5% of HBM reserved. Efficiencies: {eff}. Bytes: {b}"
    )
    return 0
