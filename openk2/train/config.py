"""Run configurations, built from shared parts.

Every training job (pre-training, SFT, RL) is configured by a dataclass that *inherits* the parts it
shares with the others instead of re-declaring their fields:

* `RunOptions`: where the run lives and how it is driven (out_dir, steps, seed, device, cadences of
  evaluation, checkpoints and log lines, progress bar, TensorBoard) -- read by `openk2.train.run`;
* `OptimizerOptions`: the optimizer, its hyper-parameters and the LR schedule -- read by
  `openk2.train.loop.build_optimizer` and `Schedule`;
* `ModelOptions`: the model (a preset or an HF-format config.json) and its tokenizer.

A job that wants another default for a shared field (SFT's smaller learning rate) re-states only the
default. `from_mapping` builds any of them from a dict (a TOML/JSON file or parsed flags) and checks
every value's type, so a wrong type is one line naming the key, the expected type and the value.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

from openk2.distributed.device import PRECISIONS
from openk2.distributed.mesh import ParallelConfig
from openk2.train.memory import MemoryOptions

OPTIMIZERS = ("muonclip", "muon", "adamw")
# Newton-Schulz precision: auto = bf16 as K2 where the hardware has bf16 units, else float32
# (optim.muon.resolve_ns_dtype); float32 for exact comparisons
NS_DTYPES = ("auto", "bfloat16", "float32")
# the names K2Tokenizer.load accepts besides a directory ("auto": by the model's vocabulary size)
TOKENIZER_NAMES = ("auto", "default", "byte-level", "byte", "bytes")


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range (one line)."""


@dataclass(kw_only=True)
class RunOptions:
    """Where a run lives and how the driver runs it (shared by pre-training, SFT and RL)."""

    out_dir: str | None = None  # None: runs/<preset or config name>
    steps: int = 200
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    eval_every: int = 50
    save_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10  # a plain log line (smoothed loss, tokens/s, MFU) every N steps
    progress: bool = True
    tensorboard: bool = True

    def validate_run(self) -> None:
        for name in ("steps", "eval_every", "save_every", "keep_checkpoints", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")


@dataclass(kw_only=True)
class OptimizerOptions:
    """The optimizer (MuonClip, plain Muon or AdamW) and the LR schedule."""

    optimizer: str = "muonclip"
    lr: float = 1e-2
    weight_decay: float = 0.1
    momentum: float = 0.95
    qk_clip_tau: float = 100.0
    grad_clip: float = 1.0
    ns_dtype: str = "auto"
    precision: str = "auto"  # bf16 autocast or fp32; auto: bf16 with bf16 hardware (device.resolve_precision)
    bias_update_rate: float = 1e-3
    aux_loss_alpha: float | None = None  # None: the model config's
    schedule: str = "wsd"
    warmup_steps: int = 20
    decay_fraction: float = 0.2
    min_lr_ratio: float = 0.1

    def validate_optimizer(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.ns_dtype not in NS_DTYPES:
            raise ConfigError(f"unknown ns_dtype {self.ns_dtype!r}; choose one of {', '.join(NS_DTYPES)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be >= 0, got {self.warmup_steps}")


@dataclass(kw_only=True)
class ModelOptions:
    """Which model to build: a preset, or any HF-format K2 / DeepSeek-V3 config.json."""

    preset: str = "small"
    model_config: str | None = None  # a config.json (or a directory holding one); overrides preset
    tokenizer: str = "auto"  # auto (by vocabulary size), default, byte-level, or a directory

    def validate_model(self) -> None:
        check_tokenizer_name(self.tokenizer)
        if self.model_config is not None and not _config_json(self.model_config).is_file():
            raise ConfigError(f"--model-config {self.model_config}: no such config.json")

    @property
    def model_name(self) -> str:
        """The run's model name: the preset, or the model config's file (or directory) name."""
        if self.model_config is None:
            return self.preset
        path = Path(self.model_config)
        return path.stem if path.suffix == ".json" and path.stem != "config" else path.resolve().parent.name

    def build_model_config(self):
        """The ModelConfig this run trains."""
        from openk2.config import ModelConfig

        if self.model_config is None:
            return ModelConfig.from_preset(self.preset)
        path = _config_json(self.model_config)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"--model-config {path}: not a readable JSON file ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"--model-config {path}: expected a JSON object, got {type(data).__name__}")
        hints = typing.get_type_hints(ModelConfig)
        for key, value in data.items():  # bos/eos ids may be lists and rope settings vary: from_dict's
            if key in hints and key not in ("extra", "bos_token_id", "eos_token_id", "rope_scaling"):
                if not _matches(value, hints[key]):
                    raise ConfigError(
                        f"--model-config {path}: key {key!r} expects {_type_name(hints[key])}, "
                        f"got {value!r} ({type(value).__name__})"
                    )
        try:
            return ModelConfig.from_dict(data).validate()
        except (TypeError, ValueError) as e:
            raise ConfigError(f"--model-config {path}: {e}") from None


def _config_json(path: str) -> Path:
    p = Path(path)
    return p / "config.json" if p.is_dir() else p


def check_tokenizer_name(name: str) -> None:
    """The one check of a tokenizer name: what `K2Tokenizer.load` accepts, or a directory."""
    if name not in TOKENIZER_NAMES and not Path(name).is_dir():
        names = ", ".join(TOKENIZER_NAMES)
        raise ConfigError(f"tokenizer must be one of {names} or a directory, got {name!r}")


# ------------------------------------------------------------------------------------------ typed dicts
T = TypeVar("T")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _matches(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(tp))
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is not None:
        return isinstance(value, origin)
    if is_dataclass(tp):
        return isinstance(value, (dict, tp))
    return isinstance(value, tp)


def from_mapping(cls: type[T], data: Any, where: str = "config") -> T:
    """cls(**data) with every key known and every value of its declared type; ConfigError otherwise
    (naming the key, the expected type and the value). Nested dataclass fields take dicts."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table of keys, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; known: {', '.join(sorted(known))}")
    kwargs = {}
    for name, f in known.items():
        if name not in data:
            if f.default is MISSING and f.default_factory is MISSING:
                raise ConfigError(f"{where}: missing key {name!r} ({_type_name(hints[name])})")
            continue
        value, tp = data[name], hints[name]
        if not _matches(value, tp):
            raise ConfigError(
                f"{where}: key {name!r} expects {_type_name(tp)}, got {value!r} ({type(value).__name__})"
            )
        if is_dataclass(tp) and isinstance(value, dict):
            value = from_mapping(tp, value, f"{where}.{name}")
        else:
            accepted = typing.get_args(tp) or (tp,)
            if type(value) is int and float in accepted and int not in accepted:
                value = float(value)  # 1 in a file where a float is expected
        kwargs[name] = value
    return cls(**kwargs)


def read_config_file(path: str | Path, what: str = "config") -> dict:
    """A .json or .toml file as a dict; ConfigError / FileNotFoundError with one line otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        if path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(path.read_text())
        elif path.suffix == ".json":
            data = json.loads(path.read_text())
        else:
            raise ConfigError(f"{what} must be .json or .toml, got {path.name}")
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{what} {path}: not valid {path.suffix[1:].upper()} ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path}: expected a table of keys, got {type(data).__name__}")
    return data


@dataclass(kw_only=True)
class TrainConfig(ModelOptions, OptimizerOptions, RunOptions):
    """`openk2 train`: pre-training on a corpus (one process, or under torchrun on a mesh)."""

    corpus: str = "shakespeare"
    batch_size: int = 16
    seq_len: int = 128
    grad_accum: int = 1
    eval_batches: int = 4
    val_fraction: float = 0.02
    document_mask: bool = False
    max_chars: int | None = None
    strict_utf8: bool = False  # invalid UTF-8 in the corpus: an error instead of a warning
    memory: MemoryOptions = field(default_factory=MemoryOptions)
    stop_at: int | None = None  # stop (as if killed) after this step, keeping the schedule of `steps`
    # layout under torchrun; dp=0: world size / (pp * ep)
    parallel: ParallelConfig = field(default_factory=lambda: ParallelConfig(dp=0))

    def validate(self) -> TrainConfig:
        from openk2.train.schedule import Schedule

        self.validate_run()
        self.validate_optimizer()
        self.validate_model()
        for name in ("batch_size", "seq_len", "grad_accum", "eval_batches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.stop_at is not None and self.stop_at < 1:
            raise ConfigError(f"stop_at must be >= 1, got {self.stop_at}")
        if self.out_dir is None:
            self.out_dir = f"runs/{self.model_name}"
        Schedule(self.schedule, self.steps, min(self.warmup_steps, self.steps), self.decay_fraction)
        return self
