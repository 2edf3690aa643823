"""`openk2 export CHECKPOINT OUT [--fp8]`: a directory other engines load as a K2 / DeepSeek-V3 model.

CHECKPOINT is a checkpoint directory or a training run directory (its latest checkpoint). The
output is the layout of the released Kimi-K2-Instruct repository: `config.json` (architectures
DeepseekV3ForCausalLM), sharded safetensors with `model.safetensors.index.json`,
`generation_config.json`, and the tokenizer three ways at once: `tiktoken.model` (K2's format,
what openk2 reads), `tokenizer.json` (the same BPE for transformers' fast tokenizer, so
`AutoTokenizer` gives openk2's ids without remote code) and `tokenizer_config.json` (the chat
template, the special tokens, `model_max_length` = the model's max positions). With `--fp8` the
projection matrices are block-FP8 e4m3 with `weight_scale_inv` and everything else bfloat16, as
in the released weights.

`--model-type deepseek_v3` (the default) lets stock transformers, vLLM and SGLang load it without
remote code; `kimi_k2` keeps the real K2 model_type, which those engines only map to the same
architecture with K2's own modelling files (not written here) and `--trust-remote-code`.

The directory is written next to its destination and renamed into place, so a failed export
leaves nothing behind; its files and folders get ordinary permissions (0666 / 0777 minus the
umask, i.e. 0644 / 0755 under the usual umask).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from openk2.checkpoint import load_tokenizer, resolve_checkpoint
from openk2.checkpoint.hf import load_pretrained, save_pretrained

SERVE_HINT = """\
Serve it with an engine that speaks K2 tool calls, e.g.:
  vllm serve {out} --served-model-name {name} --max-model-len {max_len} \\
      --enable-auto-tool-choice --tool-call-parser kimi_k2
  python -m sglang.launch_server --model-path {out} --context-length {max_len} --tool-call-parser kimi_k2
"""


def export(
    checkpoint: str | Path,
    out: str | Path,
    fp8: bool = False,
    model_type: str = "deepseek_v3",
    max_shard_bytes: int = 4 << 30,
) -> Path:
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not empty; choose a new directory")
    checkpoint = resolve_checkpoint(checkpoint)
    model = load_pretrained(checkpoint)
    model.config.model_type = model_type
    tokenizer = load_tokenizer(checkpoint, model.config.vocab_size)
    if tokenizer.vocab_size != model.config.vocab_size:
        raise ValueError(
            f"{checkpoint}: the tokenizer has {tokenizer.vocab_size} ids, the model {model.config.vocab_size}"
        )
    # Write next to the destination, then rename: a failed export leaves no half-written model.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out.parent))
    try:
        save_pretrained(model, tmp, fp8=fp8, max_shard_bytes=max_shard_bytes)
        tokenizer.save_pretrained(
            tmp, model_max_length=model.config.max_position_embeddings, hf_tokenizer=True
        )
        generation = {
            "bos_token_id": model.config.bos_token_id,
            "eos_token_id": [model.config.eos_token_id, tokenizer.im_end_id],
            "temperature": 0.6,
            "do_sample": True,
        }
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        _ordinary_permissions(tmp)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _ordinary_permissions(root: Path) -> None:
    """Files 0666 and folders 0777 minus the umask (mkdtemp makes its folder 0700)."""
    umask = os.umask(0)
    os.umask(umask)
    root.chmod(0o777 & ~umask)
    for path in root.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


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
    max_len = json.loads((out / "config.json").read_text())["max_position_embeddings"]
    print(SERVE_HINT.format(out=out, name=out.name, max_len=max_len))
    if args.model_type == "kimi_k2":
        print("model_type kimi_k2: engines also need K2's modelling files in OUT and --trust-remote-code.")
    return 0
