"""`openk2 rl CONFIG`: run the RL trainer from a JSON or TOML config (see configs/rl/ and docs/rl.md).
The run lives in the config's out_dir like any training run (openk2.train.run): it resumes there, and
its checkpoints load in `openk2 sample/serve/eval`."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="RL config (.json or .toml), e.g. configs/rl/arithmetic_tiny.json")
    parser.add_argument("--out-dir", help="override the config's out_dir")
    parser.add_argument("--steps", type=int, help="override the config's number of steps")
    parser.add_argument("--seed", type=int, help="override the config's seed")
    parser.add_argument(
        "--init", help="start from this checkpoint or run directory (overrides the config's `model`)"
    )
    parser.add_argument(
        "--no-resume", action="store_true", help="start a new run instead of resuming out_dir's"
    )
    parser.add_argument("--overwrite", action="store_true", help="with --no-resume: move the old run aside")


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from openk2.rl.trainer import RLConfig, RLTrainer
    from openk2.train.run import run_command, signal_exit_code

    def job() -> tuple[RLConfig, RLTrainer, list[dict]]:
        config = RLConfig.load(args.config)
        overrides = {
            k: getattr(args, k) for k in ("out_dir", "steps", "seed") if getattr(args, k) is not None
        }
        if args.init is not None:
            overrides["model"] = args.init
        config = replace(config, **overrides).validate()
        trainer = RLTrainer(config)
        return config, trainer, trainer.train(resume=not args.no_resume, overwrite=args.overwrite)

    result = run_command(job)
    if isinstance(result, int):
        return result
    config, trainer, history = result
    if trainer.interrupted:
        where = f"checkpoint {trainer.checkpoint}"
        print(f"{trainer.interrupted}: stopped; {where}; run the same command to resume", file=sys.stderr)
        return signal_exit_code(trainer.interrupted)
    evals = [h["eval/reward"] for h in history if "eval/reward" in h]
    print(
        f"held-out reward {evals[0]:.3f} -> {evals[-1]:.3f} over {config.steps} steps; "
        f"checkpoint {trainer.checkpoint}; curves {config.out_dir}/rl.png"
    )
    return 0
