"""The run driver: one training run's directory, lifecycle and step loop, for every training job.

Pre-training (one process or under torchrun), SFT and RL each build their model, data and step
function, then hand the rest to a `Run`:

* **The run directory.** `Run.open()` decides whether this is a fresh run or a resume, and refuses
  (one line, `RunError`) whatever would mix two runs or lose one:
  - `--out-dir` that is a file;
  - `--no-resume` on a directory that holds a run's checkpoints, unless `--overwrite`, which *moves
    the old run aside* to `<out_dir>.old-<UTC time>` (nothing is deleted);
  - a directory whose checkpoints hold a different model (other shapes);
  - a finished run ("already at step N/N; use --steps larger or --no-resume");
  - checkpoints none of which is intact.
  It removes the temporary directories of killed saves, resumes from the newest *verified*
  checkpoint (`find_resumable`: a damaged newer one is skipped with a warning, never deleted), and
  warns with the difference when the run's recorded settings differ from this command's.
* **Identity.** A fresh run gets a random run id, kept in every checkpoint's trainer state and given
  to `save_checkpoint`, whose retention deletes only this run's checkpoints.
* **The loop.** `Run.loop()` calls the job's step function, evaluates and saves on the configured
  cadence, writes metrics.jsonl (and TensorBoard), prints a plain log line every `log_every` steps
  (smoothed loss, tokens/s, TFLOP/s, MFU, ETA; also when stdout is not a terminal), and on SIGINT or
  SIGTERM finishes the current step, saves a checkpoint and returns (a second signal stops at once).
  Under torchrun the ranks agree on stopping before the (collective) save.
* **The end.** The job draws its curves from metrics.jsonl.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TypeVar

from openk2.train.config import RunOptions
from openk2.train.logging import ConsoleLog, RunLogger

T = TypeVar("T")


class RunError(ValueError):
    """The run directory or the run's state does not allow this command (one line)."""


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN/inf; the update was not applied."""


# Settings that change how a run is executed, not what it computes: changing them on resume is normal
RUNTIME_KEYS = frozenset(
    {
        "stop_at",
        "progress",
        "tensorboard",
        "threads",
        "device",
        "parallel",
        "log_every",
        "out_dir",
        "rollout_server",
    }
)
# Model config keys that fix the parameters' shapes: a checkpoint differing in one cannot be resumed
SHAPE_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "num_attention_heads", "n_shared_experts", "n_routed_experts", "num_experts_per_tok",
    "first_k_dense_replace", "moe_layer_freq", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
    "qk_rope_head_dim", "v_head_dim", "tie_word_embeddings", "num_nextn_predict_layers",
)  # fmt: skip


def print_err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def signal_exit_code(name: str) -> int:
    """The exit code of a run stopped by the signal `name` ("SIGTERM" -> 143), as shells report it."""
    return 128 + signal.Signals[name].value


def run_command(job: Callable[[], T]) -> T | int:
    """Run a training command's job (`openk2 train/sft/rl`): its result, or, after one `error:` line
    on stderr, the exit code: 1 when training diverged, 2 for a refused input (a bad flag, file, run
    directory or config value: ValueError / OSError)."""
    try:
        return job()
    except TrainingDiverged as e:
        print_err(f"error: training diverged: {e}")
        return 1
    except (ValueError, OSError) as e:
        print_err(f"error: {e}")
        return 2


def config_difference(recorded: dict, current: dict, prefix: str = "") -> list[str]:
    """'key old -> new' for every setting that differs (runtime-only settings ignored)."""
    out = []
    for key in sorted(set(recorded) | set(current)):
        if not prefix and key in RUNTIME_KEYS:
            continue
        old, new = recorded.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            out += config_difference(old, new, f"{prefix}{key}.")
        elif old != new:
            out.append(f"{prefix}{key} {old!r} -> {new!r}")
    return out


def model_difference(checkpoint: Path, model_config) -> list[str]:
    """The shape-defining model settings in which `checkpoint` differs from `model_config`."""
    import json

    try:
        saved = json.loads((checkpoint / "config.json").read_text())
    except (OSError, ValueError):
        return ["config.json unreadable"]
    mine = model_config.to_hf_dict()
    return [
        f"{k} {saved.get(k)!r} there, {mine.get(k)!r} here" for k in SHAPE_KEYS if saved.get(k) != mine.get(k)
    ]


@dataclass
class LoopResult:
    last_saved: Path | None
    record: dict | None  # the last step's record
    seconds: float
    interrupted: str | None = None  # "SIGINT" / "SIGTERM" when a signal stopped the run


class Run:
    """One training run: its directory, identity, logs and loop. See the module docstring.

    `config` is the job's full config as a dict (recorded in metrics.jsonl and in every checkpoint);
    `model_config` the ModelConfig trained. `is_main` is False on torchrun ranks other than 0, which
    take part in every decision but write nothing; `barrier` synchronises the ranks (None: one
    process)."""

    def __init__(
        self,
        options: RunOptions,
        *,
        job: str,
        config: dict,
        model_config,
        resume: bool = True,
        overwrite: bool = False,
        is_main: bool = True,
        barrier: Callable[[], None] | None = None,
    ):
        if options.out_dir is None:
            raise RunError("no output directory given")
        self.options, self.job, self.config, self.model_config = options, job, config, model_config
        self.dir = Path(options.out_dir)
        self.resume, self.overwrite, self.is_main = resume, overwrite, is_main
        self.barrier = barrier or (lambda: None)
        self.checkpoint: Path | None = None  # the checkpoint resumed from
        self.run_id: str | None = None
        self.logger: RunLogger | None = None
        self.stop_signal: int | None = None

    # ------------------------------------------------------------------ the directory
    def open(self) -> dict | None:
        """Check the run directory and decide: returns the trainer state to resume from (and sets
        `checkpoint`), or None for a fresh run. Raises RunError for a refused directory."""
        from openk2.checkpoint.store import (
            clean_stale_temps,
            find_resumable,
            list_checkpoints,
            load_trainer_state,
        )

        d = self.dir
        if d.exists() and not d.is_dir():
            raise RunError(f"--out-dir {d} is a file, not a directory")
        has_run = bool(list_checkpoints(d)) or any((d / "checkpoints").glob("step-*"))
        move_aside = False
        state = None
        if has_run and not self.resume:
            if not self.overwrite:
                raise RunError(
                    f"{d} already holds a run; resume it (drop --no-resume), choose another --out-dir, "
                    f"or add --overwrite to move the old run aside to {d}.old-<time>"
                )
            move_aside = True
        elif has_run:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                ckpt = find_resumable(d)
            if self.is_main:
                for w in caught:
                    print_err(f"warning: {w.message}")
            if ckpt is None:
                raise RunError(
                    f"{d} has checkpoints but none is intact; --no-resume --overwrite starts over "
                    "(moving the old run aside)"
                )
            diff = model_difference(ckpt, self.model_config)
            if diff:
                raise RunError(
                    f"{d} holds a run of a different model ({'; '.join(diff[:3])}); choose another --out-dir"
                )
            state = load_trainer_state(ckpt)
            if state.get("job", self.job) != self.job:
                raise RunError(f"{d} holds a {state['job']} run, not {self.job}; choose another --out-dir")
            steps = self.options.steps
            if state["step"] >= steps:
                raise RunError(
                    f"{d} is already at step {state['step']}/{steps}; use --steps larger or --no-resume"
                )
            self.checkpoint = ckpt
            self.run_id = state.get("run_id")
            diff = config_difference(state.get("config") or {}, self.config)
            if any(line.startswith("lr ") for line in diff):
                diff.append("(the learning rate stays the checkpoint's: it is part of the optimizer state)")
            if diff and self.is_main:
                print_err(
                    f"warning: resuming {d} with settings that differ from the run's: {'; '.join(diff)}"
                )
        self.barrier()  # every rank has looked before rank 0 changes anything
        if self.is_main:
            if move_aside:
                stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
                aside = d.with_name(f"{d.name}.old-{stamp}")
                n = 1
                while aside.exists():  # two overwrites within a second
                    n += 1
                    aside = d.with_name(f"{d.name}.old-{stamp}-{n}")
                d.rename(aside)
                print_err(f"moved the old run in {d} to {aside}")
            elif d.is_dir():
                clean_stale_temps(d)
            self.logger = RunLogger(d, tensorboard=self.options.tensorboard, append=state is not None)
        if self.run_id is None:
            self.run_id = self._shared_run_id()
        self.barrier()
        return state

    def _shared_run_id(self) -> str:
        """A fresh random id, the same on every rank (torchrun)."""
        import torch.distributed as dist

        rid = [uuid.uuid4().hex[:12]]
        if dist.is_available() and dist.is_initialized():
            dist.broadcast_object_list(rid, src=0)
        return rid[0]

    # ------------------------------------------------------------------ records and checkpoints
    def log(self, record: dict) -> None:
        if self.logger is not None:
            self.logger.log(record)

    def save(self, step: int, model, tokenizer, state: dict, write_model=None) -> Path:
        """Write a checkpoint of this run (main process only): the model, the tokenizer and the
        trainer state, which gets the run id, the job and the run's config. `write_model`: see
        `save_checkpoint` (a sharded checkpoint written by every rank)."""
        from openk2.checkpoint.store import save_checkpoint

        state = {**state, "job": self.job, "config": self.config, "run_id": self.run_id}
        return save_checkpoint(
            self.dir, step, model, tokenizer, state, keep=self.options.keep_checkpoints, run_id=self.run_id,
            write_model=write_model,
        )  # fmt: skip

    # ------------------------------------------------------------------ signals
    def _on_signal(self, signum, frame) -> None:
        if self.stop_signal is not None:  # the second one: stop now
            signal.signal(signum, signal.SIG_DFL)
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signum)
            return
        self.stop_signal = signum
        if self.is_main:
            name = signal.Signals(signum).name
            print_err(f"\n{name}: finishing this step and saving a checkpoint (again to stop at once)")

    def _install_signals(self) -> dict:
        if threading.current_thread() is not threading.main_thread():
            return {}
        return {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    # ------------------------------------------------------------------ the loop
    def loop(
        self,
        step_fn: Callable[[], dict],
        *,
        start_step: int,
        last_step: int,
        save_fn: Callable[[], Path | None],
        eval_fn: Callable[[int], dict | None] | None = None,
        agree: Callable[[bool], bool] = lambda stop: stop,
        console: ConsoleLog | None = None,
        desc: str = "train",
    ) -> LoopResult:
        """Run steps start_step+1 .. last_step. `step_fn()` does one step and returns its record (with
        "step"); `eval_fn(step)` runs on the eval cadence and returns either a record of its own
        (with "kind", logged after the step's) or fields merged into the step's record; `save_fn()`
        writes a checkpoint (collective under torchrun) and returns its path. `agree(stop)` turns this
        process's wish to stop into the ranks' common decision."""
        from tqdm import tqdm

        opts = self.options
        bar = tqdm(total=last_step, initial=start_step, disable=not (opts.progress and self.is_main),
                   desc=desc, unit="step", file=sys.stderr)  # fmt: skip
        last_saved, record, step, stopped = self.checkpoint, None, start_step, False
        t_start = time.perf_counter()
        handlers = self._install_signals()
        try:
            while step < last_step:
                try:
                    record = step_fn()
                except TrainingDiverged as e:
                    where = (
                        f"the last good checkpoint is {last_saved}"
                        if last_saved
                        else "no checkpoint was written"
                    )
                    raise TrainingDiverged(f"{e}; stopping the run ({where}).") from None
                step = record["step"]
                extra = (
                    eval_fn(step) if eval_fn and (step % opts.eval_every == 0 or step == opts.steps) else None
                )
                if extra and "kind" not in extra:
                    record.update(extra)
                self.log(record)
                if extra and "kind" in extra:
                    self.log(extra)
                bar.update(step - bar.n)
                if console is not None and self.is_main:
                    line = console.update(record, extra if extra and "kind" in extra else None)
                    if line:
                        bar.write(line, file=sys.stdout) if not bar.disable else print(line, flush=True)
                stop = agree(self.stop_signal is not None)
                if step % opts.save_every == 0 or step == last_step or stop:
                    last_saved = save_fn()
                if stop:
                    stopped = step < last_step
                    break
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
            bar.close()
            if self.logger is not None:
                self.logger.close()
        name = None
        if stopped:  # under torchrun another rank may have been the one signalled
            name = signal.Signals(self.stop_signal or signal.SIGTERM).name
        return LoopResult(last_saved, record, time.perf_counter() - t_start, name)
