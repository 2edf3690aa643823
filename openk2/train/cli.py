"""`openk2 train`: pre-train a model. With no arguments: the `small` preset with MuonClip on the
embedded Shakespeare corpus, sized to finish in about five minutes on two CPU cores, then a sample.
`--model-config config.json` trains any HF-format K2 / DeepSeek-V3 architecture instead of a preset.
Under `torchrun --nproc-per-node N -m openk2.cli train --pp P --ep E` the same run is spread over a
pp x dp x ep mesh (openk2/train/distributed.py). The run directory (default runs/<preset>) and its
lifecycle -- resume, refusals, signals -- are `openk2.train.run`'s; see docs/training.md."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from openk2.distributed.device import PRECISIONS
from openk2.distributed.mesh import CHECKPOINT_FORMATS, ParallelConfig
from openk2.train.config import NS_DTYPES, OPTIMIZERS, ModelOptions, OptimizerOptions, RunOptions, TrainConfig
from openk2.train.loop import pretrain
from openk2.train.memory import MemoryOptions
from openk2.train.run import run_command, signal_exit_code
from openk2.train.schedule import SCHEDULES

HELP = {
    "preset": "model preset (small, tiny, ...)",
    "model_config": "an HF-format K2 / DeepSeek-V3 config.json (or its directory) instead of a preset",
    "corpus": "shakespeare, python-stdlib, a text file / directory, or JSONL / Parquet files (a file or a "
    "directory; tokenised once into memory-mapped shards and streamed)",
    "tokenizer": "auto, default, byte-level, or a tokenizer directory",
    "out_dir": "run directory: metrics.jsonl, tensorboard/, curves.png, checkpoints/ (default runs/<preset>)",
    "steps": "optimizer steps (the schedule's length)",
    "batch_size": "sequences per micro-batch",
    "seq_len": "tokens per sequence",
    "grad_accum": "micro-batches per optimizer step",
    "lr": "peak learning rate (shared by the Muon and AdamW parts)",
    "precision": "auto: bf16 autocast where the hardware has bf16 units (CUDA, a CPU with AVX512-BF16 "
    "or AMX), "
    "fp32 elsewhere; bf16: bf16 autocast on any device (a warning where it is emulated); fp32",
    "ns_dtype": "Newton-Schulz precision (auto: bfloat16 as K2 with bf16 hardware, else float32)",
    "qk_clip_tau": "QK-Clip threshold on the max attention logit",
    "bias_update_rate": "aux-loss-free routing-bias step per optimizer step",
    "aux_loss_alpha": "sequence-wise aux loss weight (default: the model config's)",
    "max_chars": "use only the first N characters of the corpus",
    "stop_at": "stop after this step as if interrupted (resume later with the same command)",
    "threads": "torch CPU threads",
    "device": "auto, cpu, cuda, cuda:1, ...",
    "log_every": "print a log line (smoothed loss, tokens/s, MFU, ETA) every N steps",
    "strict_utf8": "refuse a corpus with invalid UTF-8 (default: warn with the count)",
}
# fields with a None default, and the type a given value has
OPTIONAL = {"out_dir": str, "model_config": str, "aux_loss_alpha": float, "max_chars": int, "stop_at": int,
            "threads": int}  # fmt: skip


def add_arguments(p: argparse.ArgumentParser) -> None:
    defaults = TrainConfig()
    shared = [ModelOptions, OptimizerOptions, RunOptions]
    group = {f.name: i for i, part in enumerate(shared) for f in fields(part)}
    # help in reading order: the model, the data (TrainConfig's own fields), the optimizer, the run
    ordered = sorted(fields(TrainConfig), key=lambda f: {0: 0, 1: 2, 2: 3}.get(group.get(f.name, -1), 1))
    for f in ordered:
        if f.name in ("memory", "progress", "tensorboard", "parallel"):
            continue
        flag = "--" + f.name.replace("_", "-")
        value = getattr(defaults, f.name)
        if isinstance(value, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=value, help=HELP.get(f.name))
            continue
        kind = OPTIONAL.get(f.name, type(value))
        choices = {"optimizer": OPTIMIZERS, "schedule": SCHEDULES, "ns_dtype": NS_DTYPES,
                   "precision": PRECISIONS}.get(f.name)  # fmt: skip
        p.add_argument(flag, type=kind, default=value, choices=choices, help=HELP.get(f.name))
    p.add_argument("--recompute", action="store_true", help="selective recomputation (norms, SwiGLU, MLA)")
    p.add_argument("--fp8-activations", action="store_true", help="save expert activations as FP8 (1x128)")
    p.add_argument("--offload", action="store_true", help="offload saved activations to pinned CPU memory")
    par = p.add_argument_group("parallel layout (under torchrun; see docs/distributed.md)")
    par.add_argument("--pp", type=int, default=1, help="pipeline stages")
    par.add_argument(
        "--ep", type=int, default=1, help="expert-parallel degree (routed experts split this way)"
    )
    par.add_argument("--dp", type=int, default=0, help="data-parallel replicas (0: processes / (pp * ep))")
    par.add_argument("--virtual-stages", type=int, default=1, help="model chunks per pipeline rank")
    par.add_argument("--microbatches", type=int, default=0, help="pipeline micro-batches (0: 2 * pp)")
    fmt_help = (
        "full: one servable HF-layout checkpoint gathered on rank 0; sharded: every rank writes "
        "its share with torch.distributed.checkpoint (`openk2 export` makes it one HF directory)"
    )
    par.add_argument("--checkpoint-format", choices=CHECKPOINT_FORMATS, default="full", help=fmt_help)
    p.add_argument("--no-resume", action="store_true", help="start a new run instead of resuming out_dir's")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="with --no-resume on a directory holding a run: move the old run aside to <out_dir>.old-<time>",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines still print)")
    p.add_argument("--no-tensorboard", action="store_true", help="no TensorBoard event files")
    p.add_argument("--no-sample", action="store_true", help="do not print a sample at the end")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    values["memory"] = MemoryOptions(args.recompute, args.fp8_activations, args.offload)
    values["progress"] = not args.no_progress
    values["tensorboard"] = not args.no_tensorboard
    values["parallel"] = ParallelConfig(args.pp, args.dp, args.ep, args.virtual_stages, args.microbatches,
                                        checkpoint=args.checkpoint_format)  # fmt: skip
    return TrainConfig(**values).validate()


def run(args: argparse.Namespace) -> int:
    cfg: TrainConfig | None = None

    def job() -> dict:
        nonlocal cfg
        cfg = config_from_args(args)
        return pretrain(cfg, resume=not args.no_resume, overwrite=args.overwrite)

    summary = run_command(job)
    if isinstance(summary, int):
        return summary
    if summary.get("rank", 0) != 0:  # under torchrun only rank 0 reports
        return 0 if not summary["interrupted"] else signal_exit_code(summary["interrupted"])
    if summary["interrupted"]:
        print(
            f"{summary['interrupted']}: stopped at step {summary['steps']}/{cfg.steps}; checkpoint "
            f"{summary['checkpoint']}; run the same command to resume",
            file=sys.stderr,
        )
        return signal_exit_code(summary["interrupted"])
    eval_loss = f"{summary['eval_loss']:.4f}" if summary["eval_loss"] is not None else "n/a"
    train_loss = f"{summary['train_loss']:.4f}" if summary["train_loss"] is not None else "n/a"
    print(
        f"trained {summary['steps']} steps, {summary['tokens']:,} tokens in {summary['seconds']:.0f} s "
        f"({summary['tokens_per_s']:.0f} tokens/s); last step's train loss {train_loss}, "
        f"eval loss {eval_loss}"
    )
    print(f"checkpoint: {summary['checkpoint']}\ncurves:     {summary['curves']}")
    if summary["steps"] < cfg.steps:  # --stop-at: the schedule runs on to --steps
        print(f"stopped at step {summary['steps']}/{cfg.steps} (--stop-at); run again without it to finish")
    if not args.no_sample and summary["checkpoint"] and summary["steps"] >= cfg.steps:
        from openk2.train.sample import generate_text

        prompt = "ROMEO:" if cfg.corpus == "shakespeare" else ""
        print(f"\n$ openk2 sample {summary['checkpoint']} --prompt {prompt!r}")
        print(generate_text(summary["checkpoint"], prompt, max_new_tokens=80, seed=cfg.seed))
    return 0
