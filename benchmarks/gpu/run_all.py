"""The one-call GPU check: parity, training MFU, Muon overhead, decode against transformers, memory.

    bash benchmarks/gpu/run_all.sh [OUT_DIR]         # on a machine with one CUDA GPU, <= 8 minutes
    python benchmarks/gpu/run_all.py --device cpu --quick --out /tmp/gpu.json   # the code path on CPU

Each section runs on its own, records its figures or its error in the JSON, and has a time budget,
so a failure in one never costs the others. Sections:

1. parity: the `tiny` model's logits on the GPU against the CPU (fp32 and bf16).
2. train: a bf16-autocast training step of a ~1B-total-parameter MoE (MLA, 32 experts top-4) with
   MuonClip; model FLOP/s and MFU against the GPU's dense bf16 peak (measured here with a large
   bf16 matmul, and the datasheet figure when the GPU is known).
   Also the same forward/backward with the routed experts as a per-expert loop instead of grouped
   GEMMs (`torch._grouped_mm`, what openk2 takes on CUDA in bf16).
3. muon: the MuonClip step (Newton-Schulz in bf16) against torch's fused AdamW on the same model.
4. decode: greedy tokens/s of the openk2 engine (eager and `compile=True`, which runs the decode step
   through CUDA graphs on a GPU) at batch 1, 16 and 64 against transformers' `generate` with the
   same weights, same dtype, one padded batch.
5. distributed: the torchrun trainer's code path on this device in one process (`DistributedTrainer`
   on a one-rank mesh: ZeRO-1 Muon, bf16 autocast, grouped experts) for a few steps, then a sharded
   (torch.distributed.checkpoint) save and load that must give back the same weights.
6. memory: peak allocated memory of each section (`peak_memory_gb`).

Not run on a GPU yet (see docs/gpu.md); `--device cpu --quick` is the CI-sized check of every path.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from openk2 import ModelConfig, Transformer  # noqa: E402
from openk2.checkpoint import save_model  # noqa: E402
from openk2.model import moe  # noqa: E402
from openk2.model.size import count_parameters, flops_per_token  # noqa: E402
from openk2.optim import MuonClip  # noqa: E402

DATASHEET_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, iters: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / iters


def moe_1b() -> ModelConfig:
    """~1B total parameters, ~0.25B activated: K2's shape at small scale."""
    c = ModelConfig.from_preset("small")
    c.hidden_size, c.num_hidden_layers, c.vocab_size = 1024, 12, 32768
    c.num_attention_heads = c.num_key_value_heads = 16
    c.q_lora_rank, c.kv_lora_rank = 384, 256
    c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim = 64, 32, 64
    c.intermediate_size, c.moe_intermediate_size = 2816, 704
    c.n_routed_experts, c.num_experts_per_tok, c.n_shared_experts = 32, 4, 1
    c.first_k_dense_replace = 1
    c.max_position_embeddings = 4096
    return c


def measured_bf16_peak(device: torch.device, n: int) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    return 2 * n**3 / timed(lambda: a @ b, device, iters=10) / 1e12


def section_parity(device: torch.device, quick: bool) -> dict:
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny")).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 64))
    with torch.no_grad():
        ref = model(ids).float()
        out = {}
        for dtype in (torch.float32, torch.bfloat16):
            dev_model = Transformer(model.config).to(device=device, dtype=dtype).eval()
            dev_model.load_state_dict(model.state_dict())
            got = dev_model(ids.to(device)).float().cpu()
            out[str(dtype).replace("torch.", "")] = {
                "max_abs_logit_error": (got - ref).abs().max().item(),
                "argmax_agreement": (got.argmax(-1) == ref.argmax(-1)).float().mean().item(),
            }
    return out


def section_train(device: torch.device, quick: bool) -> dict:
    c = moe_1b() if not quick else ModelConfig.from_preset("tiny")
    torch.manual_seed(0)
    model = Transformer(c).to(device)
    batch, seq = (8, 2048) if not quick else (2, 64)
    ids = torch.randint(0, c.vocab_size, (batch, seq + 1), device=device)
    x, y = ids[:, :-1], ids[:, 1:]
    opt = MuonClip(model, lr=1e-3, qk_clip_tau=100.0)
    use_bf16 = device.type == "cuda"

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            logits = model(x)
        F.cross_entropy(logits.float().flatten(0, 1), y.flatten()).backward()

    def step():
        fwd_bwd()
        opt.step()

    iters = 10 if not quick else 2
    t_step = timed(step, device, iters)
    t_fwd_bwd = timed(fwd_bwd, device, iters)
    moe.EXPERT_MATMUL = "loop"
    try:
        t_fwd_bwd_loop = timed(fwd_bwd, device, max(iters // 2, 1))
    finally:
        moe.EXPERT_MATMUL = "auto"
    tokens = batch * seq
    flops = 3 * flops_per_token(c, context=seq // 2)["forward"] * tokens
    p = count_parameters(c)
    out = {
        "config": {"total_params": p.total, "activated_params": p.activated, "batch": batch, "seq": seq},
        "step_s": t_step,
        "fwd_bwd_s": t_fwd_bwd,
        "fwd_bwd_expert_loop_s": t_fwd_bwd_loop,
        "grouped_experts_used": moe.use_grouped_mm(x, torch.empty(0, device=device, dtype=torch.bfloat16))
        and use_bf16,
        "tokens_per_s": tokens / t_step,
        "model_tflops_per_s": flops / t_step / 1e12,
    }
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        measured = measured_bf16_peak(device, 8192 if not quick else 1024)
        sheet = next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in name), None)
        out.update(gpu=name, measured_bf16_peak_tflops=measured, datasheet_bf16_tflops=sheet)
        out["mfu_vs_measured_peak"] = out["model_tflops_per_s"] / measured
        if sheet:
            out["mfu_vs_datasheet"] = out["model_tflops_per_s"] / sheet
    return out


def section_muon(device: torch.device, quick: bool) -> dict:
    c = moe_1b() if not quick else ModelConfig.from_preset("tiny")
    torch.manual_seed(0)
    model = Transformer(c).to(device)
    for prm in model.parameters():
        prm.grad = torch.randn_like(prm) * 1e-3
    iters = 5 if not quick else 2
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-9, fused=device.type == "cuda")
    muon = MuonClip(model, lr=1e-9, qk_clip_tau=None, ns_dtype=torch.bfloat16)
    t_adamw = timed(adamw.step, device, iters)
    t_muon = timed(muon.step, device, iters)
    return {"adamw_s": t_adamw, "muonclip_s": t_muon, "ratio": t_muon / t_adamw}


def section_decode(device: torch.device, quick: bool) -> dict:
    from transformers import DeepseekV3ForCausalLM

    from openk2.serve.engine import Engine
    from openk2.serve.sampling import SamplingParams
    from openk2.tokenizer import K2Tokenizer

    c = ModelConfig.from_preset("small")
    c.model_type = "deepseek_v3"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = Transformer(c)
    with tempfile.TemporaryDirectory() as d:
        save_model(model, d)  # transformers reads the same weights from the HF layout
        hf = DeepseekV3ForCausalLM.from_pretrained(d, dtype=dtype).to(device).eval()
    model = model.to(device=device, dtype=dtype).eval()
    tok = K2Tokenizer.default()
    new_tokens, prompt_len = (64, 64) if not quick else (8, 16)
    out: dict = {
        "dtype": str(dtype).replace("torch.", ""),
        "new_tokens": new_tokens,
        "prompt_len": prompt_len,
    }
    batches = (1, 16, 64) if not quick else (1, 4)
    for compiled in (False, True) if device.type == "cuda" else (False,):
        engine = Engine(model, tok, max_batch=max(batches), max_seq_len=prompt_len + new_tokens + 8,
                        compile=compiled)  # fmt: skip
        for b in batches:
            prompts = torch.randint(0, tok.vocab_size, (b, prompt_len)).tolist()
            params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
            engine.generate(prompts, params)  # warm-up
            sync(device)
            t0 = time.perf_counter()
            engine.generate(prompts, params)
            sync(device)
            out[f"openk2{'_compiled' if compiled else ''}_batch{b}_tok_s"] = (
                b * new_tokens / (time.perf_counter() - t0)
            )
    for b in batches:
        prompts = torch.randint(0, tok.vocab_size, (b, prompt_len), device=device)
        gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        with torch.no_grad():
            hf.generate(prompts, attention_mask=torch.ones_like(prompts), **gen)
            sync(device)
            t0 = time.perf_counter()
            hf.generate(prompts, attention_mask=torch.ones_like(prompts), **gen)
            sync(device)
        out[f"transformers_batch{b}_tok_s"] = b * new_tokens / (time.perf_counter() - t0)
        best = max(v for k, v in out.items() if k.startswith("openk2") and k.endswith(f"batch{b}_tok_s"))
        out[f"speedup_batch{b}"] = best / out[f"transformers_batch{b}_tok_s"]
    return out


def section_distributed(device: torch.device, quick: bool) -> dict:
    from openk2.distributed import checkpoint as dckpt
    from openk2.distributed.mesh import Mesh, ParallelConfig
    from openk2.train.data import Batch
    from openk2.train.distributed import DistributedTrainer
    from openk2.train.loop import TrainConfig, make_schedule

    c = ModelConfig.from_preset("tiny")
    cfg = TrainConfig(preset="tiny", steps=4, warmup_steps=1, precision="bf16", ns_dtype="float32")

    def trainer() -> DistributedTrainer:
        torch.manual_seed(0)
        return DistributedTrainer(Transformer(c), Mesh(ParallelConfig(), 0), make_schedule(cfg), cfg, device)

    a = trainer()
    ids = torch.randint(0, c.vocab_size, (4, 65), generator=torch.Generator().manual_seed(0))
    losses = [a.train_step([Batch(ids[:, :-1], ids[:, 1:], None, None)])["loss"] for _ in range(3)]
    with tempfile.TemporaryDirectory() as d:
        dckpt.save_shards(d, a.pm, a.optimizer)
        b = trainer()
        dckpt.load_shards(d, b.pm, b.optimizer)
    diff = max((p - q).abs().max().item() for p, q in zip(a.params, b.params))
    return {"losses": losses, "device": str(a.params[0].device), "reload_max_abs_diff": diff}


SECTIONS = {"parity": section_parity, "train": section_train, "muon": section_muon, "decode": section_decode,
            "distributed": section_distributed}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the code path (CPU)")
    ap.add_argument("--only", nargs="*", choices=sorted(SECTIONS), help="run only these sections")
    ap.add_argument("--out", default="gpu_results.json")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available; use --device cpu --quick", file=sys.stderr)
        return 2
    results: dict = {
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        }
    }
    for name in args.only or SECTIONS:
        t0 = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            results[name] = SECTIONS[name](device, args.quick)
        except Exception as e:  # one section's failure must not cost the others
            results[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        results[name]["seconds"] = time.perf_counter() - t0
        if device.type == "cuda":
            results[name]["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        print(f"{name}: {json.dumps(results[name], default=str)[:400]}", flush=True)
        Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
