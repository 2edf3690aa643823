"""The one `openk2` command. Each subcommand lives next to the code it drives and exposes
`add_arguments(parser)` and `run(args) -> int | None`; only the chosen one is imported, so
`openk2 info` does not pay for FastAPI and `openk2 serve` does not pay for the RL gym."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("openk2.info", "parameters, FLOPs, KV-cache and memory of a preset or checkpoint"),
    "train": ("openk2.train.cli", "pre-train a model (default: `small` on the embedded corpus)"),
    "sample": ("openk2.train.sample", "sample text from a checkpoint"),
    "tokenizer": ("openk2.tokenizer.cli", "train or inspect a K2-format tokenizer"),
    "serve": ("openk2.serve.cli", "OpenAI-compatible server for a checkpoint"),
    "chat": ("openk2.serve.chat", "terminal chat with streaming output"),
    "export": ("openk2.checkpoint.export", "write a checkpoint in the HF K2/DeepSeek-V3 layout"),
    "plan": ("openk2.distributed.plan", "memory and step-time plan for a parallel layout"),
    "synth": ("openk2.data.cli", "post-training data synthesis pipelines"),
    "sft": ("openk2.train.sft", "supervised fine-tuning on chat data"),
    "rl": ("openk2.rl.cli", "reinforcement learning with verifiable and self-critique rewards"),
    "eval": ("openk2.eval.cli", "benchmarks and tool-call conformance"),
    "agent": ("openk2.agent.cli", "tool-using agent in a sandboxed workspace, against any OpenAI endpoint"),
}


def _load(name: str):
    module, _ = COMMANDS[name]
    return importlib.import_module(module)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="openk2", description="The Kimi K2 system in plain PyTorch.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            _load(name).add_arguments(p)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    # Once a model is confident, the softmax of rare tokens underflows toward denormal floats, which
    # x86 CPUs process far slower than normal ones. Flushing them is a process-wide setting, so the
    # command sets it, not the library (it would leak into whatever else the process runs).
    import torch

    torch.set_flush_denormal(True)
    result = _load(args.command).run(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
