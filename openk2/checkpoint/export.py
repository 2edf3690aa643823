"""`openk2 export CHECKPOINT OUT [--fp8]`: a directory other engines load as a K2 / DeepSeek-V3 model.

The output is the layout of the released Kimi-K2-Instruct repository: `config.json`
(architectures DeepseekV3ForCausalLM), sharded safetensors with `model.safetensors.index.json`, the
tokenizer as `tiktoken.model` + `tokenizer_config.json` (with the chat template as Jinja), and
`generation_config.json`. With `--fp8` the projection matrices are block-FP8 e4m3 with
`weight_scale_inv`, as in the released weights.

`--model-type deepseek_v3` (the default for exports) lets stock transformers, vLLM and SGLang load it
without remote code; `kimi_k2` keeps the real K2 model_type, which those engines map to the same
architecture when given `--trust-remote-code` and K2's modelling files.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch

from openk2.checkpoint.hf import load_pretrained, save_pretrained

SERVE_HINT = """\
Serve it with an engine that speaks K2 tool calls, e.g.:
  vllm serve {out} --served-model-name {name} --enable-auto-tool-choice --tool-call-parser kimi_k2 \\
      --trust-remote-code --tensor-parallel-size 1
  python -m sglang.launch_server --model-path {out} --tool-call-parser kimi_k2 --trust-remote-code
"""


def export(
    checkpoint: str | Path,
    out: str | Path,
    fp8: bool = False,
    model_type: str = "deepseek_v3",
    max_shard_bytes: int = 4 << 30,
) -> Path:
    from openk2.tokenizer import K2Tokenizer

    checkpoint, out = Path(checkpoint), Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new directory")
    model = load_pretrained(checkpoint)
    model.config.model_type = model_type
    if (checkpoint / "tiktoken.model").exists():
        tokenizer = K2Tokenizer.from_pretrained(checkpoint)
    elif model.config.vocab_size == K2Tokenizer.default().vocab_size:
        tokenizer = K2Tokenizer.default()
    else:
        raise FileNotFoundError(
            f"{checkpoint} has no tiktoken.model and no shipped tokenizer matches its vocab"
        )
    # Write next to the destination, then rename: a failed export leaves no half-written model.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out.parent))
    try:
        save_pretrained(model, tmp, fp8=fp8, max_shard_bytes=max_shard_bytes)
        tokenizer.save_pretrained(tmp)
        generation = {
            "bos_token_id": model.config.bos_token_id,
            "eos_token_id": [model.config.eos_token_id, tokenizer.im_end_id],
            "temperature": 0.6,
            "do_sample": True,
        }
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "checkpoint",
        nargs="?",
        metavar="MODEL",
        help="checkpoint or run directory (its latest checkpoint), e.g. runs/small; same as --model",
    )
    p.add_argument("out", help="new directory to write (must not exist, or be empty)")
    p.add_argument("--model", help="checkpoint directory, or run directory (its latest checkpoint)")
    p.add_argument("--fp8", action="store_true", help="block-FP8 e4m3 weights with 128x128 scales")
    p.add_argument("--model-type", default="deepseek_v3", choices=["deepseek_v3", "kimi_k2"])
    p.add_argument("--max-shard-gb", type=float, default=4.0, help="largest safetensors shard, in GiB")


def run(args: argparse.Namespace) -> int:
    from openk2.checkpoint.store import resolve_checkpoint

    if not args.max_shard_gb > 0:
        raise ValueError(f"--max-shard-gb must be > 0, got {args.max_shard_gb}")
    checkpoint = resolve_checkpoint(args.model)  # a run directory means its latest checkpoint
    with torch.no_grad():
        out = export(
            checkpoint,
            args.out,
            fp8=args.fp8,
            model_type=args.model_type,
            max_shard_bytes=int(args.max_shard_gb * (1 << 30)),
        )
    files = sorted(p.name for p in out.iterdir())
    print(f"wrote {out} from {checkpoint}: {', '.join(files)}")
    print(SERVE_HINT.format(out=out, name=out.name))
    return 0
