"""`openk2 rl CONFIG`: run the RL trainer from a JSON or TOML config (see configs/rl/ and docs/rl.md)."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="RL config (.json or .toml), e.g. configs/rl/arithmetic_tiny.json")
    parser.add_argument("--out-dir", help="override the config's out_dir")
    parser.add_argument("--steps", type=int, help="override the config's number of steps")
    parser.add_argument("--seed", type=int, help="override the config's seed")
    parser.add_argument("--init", help="start from this checkpoint directory (overrides `model`)")


def run(args: argparse.Namespace) -> int:
    from openk2.rl.trainer import RLConfig, RLTrainer

    try:
        config = RLConfig.load(args.config)
    except (OSError, ValueError, TypeError) as e:  # one `error:` line on stderr, exit 2 (openk2/cli.py)
        raise ValueError(f"bad config {args.config}: {e}") from None
    for name in ("out_dir", "steps", "seed"):
        if getattr(args, name) is not None:
            setattr(config, name, getattr(args, name))
    if args.init is not None:
        config.model = args.init
    trainer = RLTrainer(config.validate())
    history = trainer.train()
    evals = [h for h in history if "eval/reward" in h]
    summary = {"first_eval_reward": evals[0]["eval/reward"], "last_eval_reward": evals[-1]["eval/reward"]}
    print(json.dumps({**summary, "out_dir": config.out_dir}))
    return 0
