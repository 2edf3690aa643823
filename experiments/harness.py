"""What every experiment under experiments/ shares: seeded small-model training runs on the embedded
corpus with held-out loss curves, the command line, the record of the machine, and the JSON + PNG output.

* `train_run(cfg, model)`: one run of `openk2.train.loop.Trainer` (the optimizer step `openk2 train`
  uses) on the Shakespeare corpus, without the run directory, checkpoints or resume of `pretrain`:
  an experiment wants many short runs and their curves, not restartable jobs. The held-out loss is
  measured at step 0, every `eval_every` steps and at the end, on the same fixed held-out batches for
  every run; the cost is counted in CPU seconds (`time.process_time`, all threads of the process).
* `run_config(...)`: the shared settings (the `tiny` preset's data settings: 8 x 128-token batches,
  WSD schedule, fp32 training and fp32 Newton-Schulz, so a result does not depend on whether the CPU
  has bf16 units).
* `parser(name)` / `setup(args)`: every experiment takes `--out DIR` (default
  `runs/<name>/`), `--docs` (write into docs/ instead, to refresh the committed results), `--threads`
  (default 1: CPU seconds are comparable across machines and loads) and `--quick` (a seconds-long
  smoke run for the tests).
* `write_result(out, name, result, plot)`: `<name>.json` (with the environment: CPU and its bf16
  support, torch, threads, precision) and `<name>.png`; `write_json(path, obj)`: the atomic write
  every experiment uses for its results and the progress files it resumes from.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from openk2.config import ModelConfig  # noqa: E402
from openk2.train.config import TrainConfig  # noqa: E402

CORPUS = "shakespeare"
MAX_CHARS = 2_000_000  # the first 2M characters of the embedded corpus


def run_config(**overrides) -> TrainConfig:
    """The experiments' shared training settings; any TrainConfig field can be overridden."""
    settings = dict(
        preset="tiny",
        corpus=CORPUS,
        max_chars=MAX_CHARS,
        batch_size=8,
        seq_len=128,
        warmup_steps=10,
        eval_batches=4,
        precision="fp32",
        ns_dtype="float32",
        progress=False,
        tensorboard=False,
        device="cpu",
    )
    settings.update(overrides)
    return TrainConfig(**settings).validate()


def tiny_model(**changes) -> ModelConfig:
    """The `tiny` preset with some fields changed (validated)."""
    return dataclasses.replace(ModelConfig.from_preset("tiny"), **changes).validate()


def train_run(cfg: TrainConfig, model_cfg: ModelConfig | None = None, eval_every: int = 25) -> dict:
    """Train `model_cfg` (default: cfg's preset) with cfg's optimizer, schedule, data and seed; return
    the curves: per step the tokens seen, train loss, max attention logit and QK-Clip head clips; the
    held-out loss at (eval_tokens, eval_loss); final losses, parameter counts and CPU seconds.

    The seed fixes both the initialisation and the order of the batches, so two runs with the same
    seed differ only in what the experiment changed (a paired comparison)."""
    from openk2.model.size import count_parameters
    from openk2.model.transformer import Transformer
    from openk2.train.loop import Trainer, build_optimizer, make_schedule, prepare_data

    model_cfg = model_cfg or cfg.build_model_config()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    _, loader, eval_batches, facts = prepare_data(cfg, model_cfg.vocab_size)
    torch.manual_seed(cfg.seed)
    model = Transformer(model_cfg)
    trainer = Trainer(model, build_optimizer(model, cfg), make_schedule(cfg), cfg, torch.device("cpu"))
    curves: dict[str, list] = {k: [] for k in ("tokens", "loss", "max_logit", "heads_clipped")}
    eval_tokens, eval_loss = [0], [trainer.evaluate(eval_batches)]
    cpu0 = time.process_time()
    for step in range(1, cfg.steps + 1):
        rec = trainer.train_step([loader.next_batch() for _ in range(cfg.grad_accum)])
        for k in curves:
            curves[k].append(rec[k])
        if step % eval_every == 0 or step == cfg.steps:
            eval_tokens.append(rec["tokens"])
            eval_loss.append(trainer.evaluate(eval_batches))
    counts = count_parameters(model_cfg)
    last = curves["loss"][-10:]
    return {
        **curves,
        "eval_tokens": eval_tokens,
        "eval_loss": eval_loss,
        "final_eval_loss": eval_loss[-1],
        "final_train_loss": sum(last) / len(last),  # mean of the last 10 steps
        "parameters": counts.total,
        "activated_parameters": counts.activated,
        "cpu_seconds": time.process_time() - cpu0,
        "held_out_tokens": sum(b.num_tokens for b in eval_batches),
        "train_tokens_available": facts.get("train_tokens"),
    }


def smooth(xs: list[float], w: int = 10) -> list[float]:
    """Trailing moving average over w points (fewer at the start)."""
    return [sum(xs[max(0, i - w + 1) : i + 1]) / len(xs[max(0, i - w + 1) : i + 1]) for i in range(len(xs))]


def spread(xs: list[float]) -> dict:
    """Mean, sample standard deviation (0 for one value), min and max of xs."""
    return {
        "mean": statistics.fmean(xs),
        "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
        "min": min(xs),
        "max": max(xs),
        "n": len(xs),
    }


def parser(name: str, doc: str | None) -> argparse.ArgumentParser:
    """The command line every experiment shares; the experiment adds its own flags."""
    p = argparse.ArgumentParser(
        prog=f"experiments/{name}.py",
        description=(doc or "").strip().split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", default=f"runs/{name}", help="directory for the JSON and PNG")
    p.add_argument(
        "--docs",
        action="store_true",
        help="write into docs/ instead of --out (refreshes the committed result)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (CPU seconds are counted over all)")
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke run (the tests use it)")
    return p


def setup(args: argparse.Namespace) -> Path:
    """Apply --threads; return where the results go: docs/ with --docs, else --out (created)."""
    out = ROOT / "docs" if args.docs else Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    return out


def environment(threads: int) -> dict:
    """The machine and precision behind a result (what `openk2 env` prints)."""
    from openk2.cli import environment_report

    env = dict(environment_report())
    return {
        "cpu": env.get("cpu"),
        "cpu_features": env.get("cpu features"),
        "torch": env.get("torch"),
        "threads": threads,
        "training_precision": "fp32",
        "newton_schulz_dtype": "float32",
    }


def write_json(path: Path, obj, indent: int | None = 1) -> None:
    """Write `obj` as JSON atomically (a temporary file, then a rename): a run killed while writing
    leaves the previous file whole, so a script that resumes from it can always read it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=indent) + "\n")
    os.replace(tmp, path)


def stop_if_interrupted(trainer, what: str) -> None:
    """After `RLTrainer.train` returned: when SIGINT/SIGTERM stopped it (the run driver saved a
    checkpoint and returned), stop the whole script instead of going on to the next run."""
    if trainer.interrupted:
        raise SystemExit(f"{what}: {trainer.interrupted}, stopped (its checkpoint is saved)")


def write_result(out: Path, name: str, result: dict, plot: Callable[[dict, Path], None], args) -> None:
    """Write out/<name>.json (with the command and environment) and out/<name>.png; print a summary
    without the curves."""
    command = "python " + " ".join([f"experiments/{name}.py", *sys.argv[1:]])
    result = {"command": command, "environment": environment(args.threads), **result}
    write_json(out / f"{name}.json", result)
    import matplotlib

    matplotlib.use("Agg")
    plot(result, out / f"{name}.png")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    print(f"wrote {out / (name + '.json')} and {out / (name + '.png')}", file=sys.stderr)
