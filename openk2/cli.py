"""The one `openk2` command. Each subcommand lives next to the code it drives and exposes
`add_arguments(parser)` and `run(args) -> int | None`; only the chosen one is imported, so
`openk2 info` does not pay for FastAPI and `openk2 serve` does not pay for the RL gym.

What every subcommand gets from here, so that no command has to do it itself:

* One error style: a mistake is one line on stderr, `error: ...`, and no traceback unless `--debug`.
  Exit 2 when the command line is wrong: a bad flag or value, a value out of range (`ValueError`), a
  path that does not exist or is the wrong kind (a file where a directory belongs, a non-empty output
  directory), a bad `--config` file. Exit 1 when the command fails while running: a corrupt
  checkpoint, a busy port, a diverged run, anything unexpected. Ctrl-C prints one line, exit 130.
* `--config FILE`: a TOML or JSON table whose keys are the command's flags (dashes or underscores);
  values are checked against each flag's type and choices, and flags on the command line win.
* `--device`: a CUDA device on a machine without CUDA is refused before anything is loaded.
* Help that shows each flag's default once.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

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
    "env": ("", "versions, CPU features, GPU and precision choices (for bug reports)"),
}

# The `--config` options file (consumed before parsing; the action only documents it).
_OPTIONS_DEST = "_options_file"
_MODEL_CONFIG_KEYS = {"model_type", "hidden_size", "architectures", "num_hidden_layers"}


class UsageError(Exception):
    """A mistake in how a command was called: printed as one line, exit status 2."""


# ---------------------------------------------------------------------------------------------------
# Parser and help


class HelpFormatter(argparse.HelpFormatter):
    """Appends `(default: X)` to a flag's help, unless the help already names its default or there is
    no meaningful one (None, False, a switch)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "default" in text.lower()
            or default is None
            or default is False
            or default == argparse.SUPPRESS
            or not (action.option_strings or action.nargs in ("?", "*"))
            or action.nargs == 0
        ):
            return text
        return f"{text} (default: %(default)s)".strip()


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (raised, not printed) and the help formatter above; nested
    subcommand parsers (`synth rephrase`) are of this class too."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message}")


def _document_defaults(parser: argparse.ArgumentParser) -> None:
    """Give every flag that has a default but no help a help line, so `--help` shows the default."""
    for action in parser._actions:
        meaningful = action.default is not None and not isinstance(action.default, bool)
        if action.help is None and action.option_strings and meaningful:
            if action.nargs != 0 and action.default != argparse.SUPPRESS:
                action.help = "(default: %(default)s)"
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _document_defaults(child)


# ---------------------------------------------------------------------------------------------------
# The model flag: the same meaning in every command


def _merge_model_path(args: argparse.Namespace) -> None:
    """`--model PATH` is a checkpoint or run directory everywhere; commands the README calls with the
    path as the first argument (`openk2 sample runs/small`) also take it as positional MODEL, stored
    as `checkpoint`. After this, both attributes hold the one path given."""
    if not (hasattr(args, "checkpoint") and hasattr(args, "model")):
        return
    given = [p for p in (args.checkpoint, args.model) if p]
    if len(given) == 2 and given[0] != given[1]:
        raise UsageError(f"give the model once: MODEL {given[0]!r} and --model {given[1]!r} differ")
    if not given:
        raise UsageError(f"openk2 {args.command}: give a checkpoint or run directory (MODEL or --model PATH)")
    args.checkpoint = args.model = given[0]


# ---------------------------------------------------------------------------------------------------
# --config FILE


def _leaf_parser(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.ArgumentParser:
    """The parser that will parse the innermost subcommand named in argv (`synth` -> `tools`)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for token in argv:
                if token in action.choices:
                    return _leaf_parser(action.choices[token], argv[argv.index(token) + 1 :])
    return parser


def _take_config_flag(argv: list[str]) -> tuple[str | None, list[str]]:
    """(FILE, argv without `--config FILE`) for the first `--config` before a bare `--`."""
    for i, token in enumerate(argv):
        if token == "--":
            break
        if token == "--config":
            if i + 1 >= len(argv) or argv[i + 1].startswith("-"):
                raise UsageError("--config: expected a TOML or JSON file")
            return argv[i + 1], argv[:i] + argv[i + 2 :]
        if token.startswith("--config="):
            return token.split("=", 1)[1], argv[:i] + argv[i + 1 :]
    return None, argv


def _is_model_config(path: str) -> bool:
    """A checkpoint/run directory or an HF model config.json: what `info --config` and `plan --config`
    have always meant, as opposed to an options file."""
    p = Path(path)
    if p.is_dir():
        return True
    if p.suffix != ".json" or not p.is_file():
        return False
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and bool(_MODEL_CONFIG_KEYS & set(data))


def read_options_file(path: str) -> dict:
    """The table in a TOML or JSON options file (format by suffix; otherwise JSON, then TOML)."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--config {path}: {'is a directory' if p.is_dir() else 'no such file'}")
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--config {path}: cannot read it ({e})") from None
    import tomllib

    formats = {".toml": ("TOML",), ".json": ("JSON",)}.get(p.suffix.lower(), ("JSON", "TOML"))
    error = None
    for name in formats:
        try:
            data = json.loads(text) if name == "JSON" else tomllib.loads(text)
            break
        except ValueError as e:  # JSONDecodeError and TOMLDecodeError are ValueErrors
            error = f"not valid {name} ({' '.join(str(e).split())})"
    else:
        raise UsageError(f"--config {path}: {error}")
    if not isinstance(data, dict):
        raise UsageError(f"--config {path}: expected a table of flag = value, got {type(data).__name__}")
    return data


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _convert_option(path: str, key: str, action: argparse.Action, value):
    """`value` from the options file, checked and converted as argparse would the flag's text."""

    def fail(expected: str, got=value):
        raise UsageError(f"--config {path}: key '{key}' expects {expected}, got {got!r}")

    switches = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)
    if isinstance(action, switches):
        if not isinstance(value, bool):
            fail("true or false")
        return value
    many = (
        action.nargs in ("+", "*")
        or isinstance(action.nargs, int)
        or isinstance(action, argparse._AppendAction)
    )
    kind = action.type or str
    expected = _TYPE_NAMES.get(kind, getattr(kind, "__name__", "a value"))

    def one(v):
        if kind is str:
            if not isinstance(v, str):
                fail(f"{expected}" + (" (a list of them)" if many else ""), v)
            out = v
        elif kind is int:
            if isinstance(v, bool) or not isinstance(v, int):
                fail(expected, v)
            out = v
        elif kind is float:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                fail(expected, v)
            out = float(v)
        else:
            if isinstance(v, (bool, list, dict)):
                fail(expected, v)
            try:
                out = kind(v if isinstance(v, str) else str(v))
            except (argparse.ArgumentTypeError, TypeError, ValueError):
                fail(expected, v)
        if action.choices is not None and out not in action.choices:
            fail("one of " + ", ".join(map(str, action.choices)), v)
        return out

    if many:
        if not isinstance(value, list):
            fail(f"a list of {expected.removeprefix('an ').removeprefix('a ')}s")
        return [one(v) for v in value]
    return one(value)


def apply_options_file(parser: argparse.ArgumentParser, path: str) -> None:
    """Make the file's values the parser's defaults (the command line still overrides them)."""
    actions: dict[str, argparse.Action] = {}
    for action in parser._actions:
        skip = (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)
        if isinstance(action, skip) or action.dest in (argparse.SUPPRESS, _OPTIONS_DEST):
            continue
        if action.help == argparse.SUPPRESS and action.dest in actions:
            continue  # a hidden alias: the visible flag describes the key
        actions.setdefault(action.dest, action)
    defaults = {}
    for key, value in read_options_file(path).items():
        dest = str(key).replace("-", "_")
        action = actions.get(dest)
        if action is None or dest.startswith("_"):
            known = ", ".join(sorted(d.replace("_", "-") for d in actions if not d.startswith("_")))
            raise UsageError(f"--config {path}: unknown key '{key}' (known: {known})")
        defaults[dest] = _convert_option(path, str(key), action, value)
        action.required = False
        if not action.option_strings and action.nargs is None:
            action.nargs = "?"  # a positional the file supplies
    parser.set_defaults(**defaults)


# ---------------------------------------------------------------------------------------------------
# `openk2 env`


def environment_report() -> list[tuple[str, str]]:
    """(name, value) rows: versions, CPU, GPU, threads and the precision `auto` choices resolve to."""
    from importlib import metadata

    import torch

    from openk2.optim.muon import resolve_ns_dtype

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    from openk2 import __version__
    from openk2.distributed.device import cpu_model_and_flags, resolve_precision

    cpu, flags = cpu_model_and_flags()
    features = {
        "AVX2": "avx2" in flags,
        "AVX512": "avx512f" in flags,
        "AVX512-BF16": "avx512_bf16" in flags or getattr(torch.cpu, "_is_avx512_bf16_supported", bool)(),
        "AMX": "amx_tile" in flags or getattr(torch.cpu, "_is_amx_tile_supported", bool)(),
    }
    rows = [
        ("openk2", __version__),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("transformers", version("transformers")),
        ("platform", platform.platform()),
        ("cpu", cpu),
        ("cpu features", " ".join(f"{k}:{'yes' if v else 'no'}" for k, v in features.items())),
        ("torch cpu capability", torch.backends.cpu.get_cpu_capability()),
        ("cpu cores", str(os.cpu_count())),
        ("torch threads", str(torch.get_num_threads())),
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            rows.append(
                (f"gpu {i}", f"{p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}")
            )
        rows.append(("cuda", str(torch.version.cuda)))
    else:
        rows.append(("gpu", "none (torch.cuda.is_available() is False)"))
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        ns = resolve_ns_dtype("auto", torch.device(device))
        rows.append((f"Newton-Schulz auto on {device}", str(ns).removeprefix("torch.")))
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        rows.append((f"train --precision auto on {device}", resolve_precision(torch.device(device), "auto")))
    rows.append(("train --device auto", "cuda" if torch.cuda.is_available() else "cpu"))
    return rows


def _env_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _env_run(args: argparse.Namespace) -> int:
    rows = environment_report()
    if args.json:
        print(json.dumps(dict(rows), indent=2))
        return 0
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0


# ---------------------------------------------------------------------------------------------------
# main


def _load(name: str):
    if name == "env":
        return SimpleNamespace(add_arguments=_env_arguments, run=_env_run)
    module, _ = COMMANDS[name]
    return importlib.import_module(module)


def _check_device(args: argparse.Namespace) -> None:
    """`--device` names a device this machine has (checked before any model is loaded)."""
    device = getattr(args, "device", None)
    if not isinstance(device, str) or device == "auto":
        return
    from openk2.distributed.device import DeviceError, resolve_device

    try:
        resolve_device(device)
    except DeviceError as e:
        raise UsageError(str(e)) from None


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _describe(e: BaseException) -> tuple[str, int]:
    """(message, exit status) of an exception that ends a command."""
    if isinstance(e, UsageError):
        return _one_line(e), 2
    wrong_path = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError)
    status = 2 if isinstance(e, wrong_path) else 1
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        target = e.filename if e.filename2 is None else f"{e.filename} -> {e.filename2}"
        return _one_line(f"{target}: {e.strerror}"), status
    if isinstance(e, wrong_path):
        return _one_line(e), 2
    if isinstance(e, ValueError):
        return _one_line(e), 2
    if isinstance(e, KeyError) and len(e.args) == 1 and isinstance(e.args[0], str) and " " in e.args[0]:
        return _one_line(e.args[0]), 2  # a lookup of something the user named, with its message
    known = (OSError, RuntimeError, ImportError)
    text = _one_line(e) or type(e).__name__
    if isinstance(e, known) and type(e).__module__.startswith(("openk2", "builtins")):
        return text, 1
    return f"{type(e).__name__}: {text} (run with --debug for the traceback)", 1


def _build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser | None]:
    from openk2 import __version__

    parser = Parser(prog="openk2", description="The Kimi K2 system in plain PyTorch.")
    parser.add_argument("--version", action="version", version=f"openk2 {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    chosen_parser = None
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            _load(name).add_arguments(p)
            _document_defaults(p)
            chosen_parser = p
    return parser, chosen_parser


def _add_options_flag(parser: argparse.ArgumentParser) -> None:
    if any("--config" in a.option_strings for a in parser._actions):
        return  # the command's own --config (info, plan: a model config); options files still work
    parser.add_argument(
        "--config",
        dest=_OPTIONS_DEST,
        metavar="FILE",
        help="TOML or JSON file of this command's flags (keys with dashes or underscores); "
        "flags given on the command line win",
    )


def parse_command(argv: list[str]) -> argparse.Namespace:
    """The parsed command line of `openk2 ARGV`, `--config FILE` applied (UsageError if it is wrong).
    Nothing is run; tests/test_docs.py parses every documented command with it."""
    parser, chosen = _build_parser(argv)
    if chosen is not None:
        after = argv[argv.index(chosen.prog.split()[-1]) + 1 :]
        leaf = _leaf_parser(chosen, after)
        _add_options_flag(leaf)
        path, rest = _take_config_flag(after)
        own = any("--config" in a.option_strings for a in leaf._actions if a.dest != _OPTIONS_DEST)
        if path is not None and not (own and _is_model_config(path)):
            apply_options_file(leaf, path)
            argv = argv[: len(argv) - len(after)] + rest
    args = parser.parse_args(argv)
    if args.command is not None:
        _merge_model_path(args)
    return args


def run_command(argv: list[str]) -> int:
    args = parse_command(argv)
    if args.command is None:
        _build_parser([])[0].print_help(sys.stderr)
        return 2
    _check_device(args)
    # Once a model is confident, the softmax of rare tokens underflows toward denormal floats, which
    # x86 CPUs process far slower than normal ones. Flushing them is a process-wide setting, so the
    # command sets it, not the library (it would leak into whatever else the process runs).
    import torch

    torch.set_flush_denormal(True)
    result = _load(args.command).run(args)
    return int(result or 0)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """openk2's own warnings (a damaged checkpoint skipped, a corpus with invalid bytes) as one
    `warning: ...` line on stderr; everyone else's the usual way."""
    if category.__module__.startswith("openk2"):
        print(f"warning: {_one_line(str(message))}", file=file or sys.stderr)
    else:
        _default_show_warning(message, category, filename, lineno, file, line)


_default_show_warning = warnings.showwarning


def main(argv: list[str] | None = None) -> int:
    warnings.showwarning = _show_warning
    argv = list(sys.argv[1:] if argv is None else argv)
    end = argv.index("--") if "--" in argv else len(argv)
    debug = "--debug" in argv[:end] or os.environ.get("OPENK2_DEBUG") == "1"
    argv = [a for i, a in enumerate(argv) if a != "--debug" or i >= end]
    try:
        return run_command(argv)
    except KeyboardInterrupt:
        if debug:
            raise
        print("\nerror: interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:  # argparse's --help/--version, or a module's SystemExit("message")
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        message = _one_line(e.code).removeprefix("error:").strip()
        print(f"error: {message}", file=sys.stderr)
        return 2  # commands raise SystemExit("error: ...") for what they were given
    except BrokenPipeError:  # `openk2 ... | head`: the reader left; nothing to report
        sys.stderr.close()
        return 0
    except Exception as e:
        if debug:
            raise
        message, status = _describe(e)
        print(f"error: {message}", file=sys.stderr)
        return status


if __name__ == "__main__":
    sys.exit(main())
