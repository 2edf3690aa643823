"""Training checkpoints that are also servable HF checkpoints, written so that no crash loses work.

A checkpoint is a directory `<run>/checkpoints/step-XXXXXXX/` holding

* the model in the HF K2 layout (config.json, safetensors shards, index), so `openk2 sample`,
  `openk2 serve`, SFT and RL load it with `openk2.checkpoint.load`;
* the tokenizer (tiktoken.model + tokenizer_config.json);
* `trainer_state.pt`: optimizer state, step, data position, RNG states and the run's config, which
  is everything else an exact resume needs (the routing bias is a model buffer, stored with the
  weights; the LR schedule is a pure function of the step);
* `manifest.json`, written last: the run id, the step, and the size and sha256 of every other file.

Integrity rules (docs/training.md, "Checkpoint integrity"):

* A checkpoint is written into `.tmp-step-XXXXXXX-<host>-<pid>/` beside its final place, every file
  and the directory are fsync'd, then it is renamed into place; a kill at any moment leaves the
  complete new checkpoint or none, plus at most a temporary directory that `clean_stale_temps`
  removes once its writer is dead.
* `verify_checkpoint` checks the manifest (sizes always, sha256 unless asked not to); a checkpoint
  without a manifest (written before manifests existed) is accepted with a warning.
* Warnings are `CheckpointWarning`s (`warnings.warn`), one line each, for the command to print.
* `find_resumable` returns the newest checkpoint that verifies, warning once per newer one that does
  not; nothing here ever deletes a checkpoint that failed verification.
* Retention deletes only older checkpoints whose manifest names the saving run's id.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import socket
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from openk2.checkpoint.hf import CheckpointError

STATE_FILE = "trainer_state.pt"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
# Above this many bytes of files, verify="auto" checks sizes only (hashing reads every byte).
AUTO_HASH_LIMIT = 1 << 30
VERIFY_MODES = ("full", "size", "auto")
_STEP_DIR = re.compile(r"^step-(\d+)$")
# .tmp-step-0000004-<host>-<pid> (being written) and .tmp-step-0000004-<host>-<pid>.old (a replaced
# checkpoint being removed); checkpoints written before hosts were recorded lack the `<host>-` part.
_TEMP_DIR = re.compile(r"^\.tmp-step-(\d+)-(?:(?P<host>.+)-)?(?P<pid>\d+)(?:\.old)?$")
_CHUNK = 8 << 20


class CheckpointWarning(UserWarning):
    """Something about a run's checkpoints worth a line on stderr that does not stop the caller: a
    damaged checkpoint skipped, an older one without a manifest, a temporary directory left alone.
    Commands catch these (`warnings.catch_warnings(record=True)`) and print `warning: <message>`."""


def _warn(message: str, stacklevel: int = 3) -> None:
    """Warn on behalf of the public function `stacklevel - 1` frames up (its caller is blamed)."""
    warnings.warn(message, CheckpointWarning, stacklevel=stacklevel)


# ------------------------------------------------------------------------------------------ RNG state
def rng_state() -> dict:
    """Every generator's state in plain types and tensors (numpy's key array as an int64 tensor), so
    the trainer state loads with `torch.load(weights_only=True)`: no pickled code runs on resume."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    if isinstance(keys, torch.Tensor):
        keys = keys.numpy().astype(np.uint32)
    np.random.set_state((name, keys, *rest))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------ listing
def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:07d}"


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The step in a `step-XXXXXXX` directory name, or None for any other name."""
    m = _STEP_DIR.match(Path(path).name)
    return int(m.group(1)) if m else None


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Checkpoints of a run, oldest first: `step-*` directories holding a manifest or a trainer state
    (temporary directories are never listed). A listed checkpoint is not necessarily intact; see
    `verify_checkpoint` and `find_resumable`."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [
        (step, p)
        for p in root.iterdir()
        if (step := checkpoint_step(p)) is not None
        and p.is_dir()
        and ((p / STATE_FILE).is_file() or (p / MANIFEST_FILE).is_file())
    ]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest listed checkpoint, intact or not (resuming should use `find_resumable`)."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory, or a run directory (-> its latest checkpoint)."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"{path}: neither a checkpoint (no config.json) nor a run with checkpoints")
    return latest


# ------------------------------------------------------------------------------------------ manifest
def _hash(file: Path, sync: bool = False) -> str:
    """sha256 of a file, read once; with sync, the same open file is fsync'd so the bytes hashed are
    on disk."""
    digest = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(file, "rb") as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
        if sync:
            os.fsync(f.fileno())
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_manifest(directory: Path, run_id: str | None, step: int) -> None:
    files = {}
    for file in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = file.relative_to(directory).as_posix()
        files[rel] = {"size": file.stat().st_size, "sha256": _hash(file, sync=True)}
    manifest = {"format": MANIFEST_FORMAT, "run_id": run_id, "step": step, "files": files}
    target = directory / MANIFEST_FILE
    with open(target, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    for sub in {p.parent for p in directory.rglob("*")} | {directory}:
        _fsync_dir(sub)


def read_manifest(path: str | os.PathLike) -> dict | None:
    """A checkpoint's manifest, checked for shape; None when the checkpoint has none (legacy).
    Raises CheckpointError when it exists but cannot be used."""
    file = Path(path) / MANIFEST_FILE
    if not file.exists():
        return None
    try:
        manifest = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: unreadable manifest ({e})") from e
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if (
        not isinstance(files, dict)
        or manifest.get("format") != MANIFEST_FORMAT
        or not isinstance(manifest.get("run_id"), (str, type(None)))
    ):
        raise CheckpointError(f"{file}: unreadable manifest (not a format-{MANIFEST_FORMAT} file list)")
    for name, entry in files.items():
        parts = Path(name).parts
        if Path(name).is_absolute() or ".." in parts or not parts:
            raise CheckpointError(f"{file}: unreadable manifest (file name {name!r} leaves the checkpoint)")
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("size"), int)
            and isinstance(entry.get("sha256"), str)
        ):
            raise CheckpointError(f"{file}: unreadable manifest (entry for {name!r} lacks size or sha256)")
    return manifest


def _manifest_run_id(path: Path) -> tuple[bool, str | None]:
    """(has a readable manifest, its run id)."""
    try:
        manifest = read_manifest(path)
    except CheckpointError:
        return False, None
    return (manifest is not None, manifest.get("run_id") if manifest else None)


def verify_checkpoint(path: str | os.PathLike, verify: str = "full") -> None:
    """Check a checkpoint against its manifest; raises CheckpointError naming the first bad file.

    verify: "full" compares sizes and sha256 (reads every byte), "size" compares sizes only (a stat
    per file: catches truncated, missing and extended files, not overwritten bytes), "auto" hashes
    when the files total at most AUTO_HASH_LIMIT bytes, else checks sizes.

    A directory without a manifest passes, as there is nothing to check it against: a plain HF model
    (`save_model`, `openk2 export`, a downloaded checkpoint) silently, a training checkpoint written
    before manifests existed with a CheckpointWarning.
    """
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify must be 'full', 'size' or 'auto', not {verify!r}")
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory is missing")
    manifest = read_manifest(path)
    if manifest is None:
        if (path / STATE_FILE).exists():
            _warn(f"{path}: no {MANIFEST_FILE} (an older checkpoint); its files cannot be verified")
        return
    files = manifest["files"]
    for name, entry in files.items():
        file = path / name
        try:
            size = file.stat().st_size
        except FileNotFoundError:
            raise CheckpointError(f"{file}: missing (listed in {MANIFEST_FILE})") from None
        except OSError as e:
            raise CheckpointError(f"{file}: unreadable ({e.strerror or e})") from None
        if size != entry["size"]:
            raise CheckpointError(f"{file}: size {size} bytes, the manifest says {entry['size']}")
    total = sum(e["size"] for e in files.values())
    if verify == "size" or (verify == "auto" and total > AUTO_HASH_LIMIT):
        return
    for name, entry in files.items():
        file = path / name
        try:
            digest = _hash(file)
        except OSError as e:
            raise CheckpointError(f"{file}: unreadable ({e.strerror or e})") from None
        if digest != entry["sha256"]:
            raise CheckpointError(f"{file}: checksum mismatch (sha256 differs from the manifest's)")


def find_resumable(run_dir: str | os.PathLike, verify: str = "full") -> Path | None:
    """The newest checkpoint of the run that verifies, or None. Each newer checkpoint that fails gets
    one warning line saying what is wrong and where; it is left on disk, untouched."""
    for ckpt in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(ckpt, verify=verify)
        except CheckpointError as e:
            _warn(f"skipping damaged checkpoint: {e}")
            continue
        return ckpt
    return None


# ------------------------------------------------------------------------------------------ cleanup
def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_stale_temps(run_dir: str | os.PathLike) -> list[Path]:
    """Remove temporary directories left by saves that were killed; returns those removed.

    A temporary directory is removed only when its writer is this host's process that no longer runs
    (or is this process: a save that failed here and already unwound). Directories written by a live
    process, or on another host (a shared file system, where that pid means nothing here), are left
    and named in a warning, so two jobs pointed at one run directory never delete each other's saves.
    """
    root = Path(run_dir) / "checkpoints"
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    host = _host()
    for p in sorted(root.iterdir()):
        m = _TEMP_DIR.match(p.name)
        if not m:
            continue
        pid = int(m.group("pid"))
        writer_host = m.group("host")
        if writer_host not in (None, host):
            _warn(f"{p}: left in place, written on host {writer_host}")
            continue
        if pid != os.getpid() and _pid_alive(pid):
            _warn(f"{p}: left in place, its writer (pid {pid}) is still running")
            continue
        shutil.rmtree(p, ignore_errors=True)
        if not p.exists():
            removed.append(p)
    return removed


# ------------------------------------------------------------------------------------------ save
def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model,
    tokenizer,
    trainer_state: dict,
    keep: int = 2,
    run_id: str | None = None,
    write_model: Callable[[Path], None] | None = None,
) -> Path:
    """Write the checkpoint for `step` atomically, then keep only the newest `keep` of this run's.

    Retention deletes only checkpoints older than `step` whose manifest names `run_id` (a None run_id
    matches checkpoints saved with None); checkpoints of another run, or without a readable manifest,
    are never deleted. `write_model(tmp)`, when given, writes the weights into the temporary
    directory instead of `save_pretrained(model, tmp)` (the sharded format, written by every rank;
    `openk2.distributed.checkpoint`). An existing checkpoint at `step` is replaced when it is this
    run's and intact (re-saving the final step); otherwise it is renamed to
    `step-XXXXXXX.replaced-<time>` and kept.
    """
    final = checkpoint_dir(run_dir, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{_host()}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    from openk2.checkpoint.hf import save_pretrained

    try:
        if write_model is not None:
            tmp.mkdir()
            write_model(tmp)
        else:
            save_pretrained(model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        torch.save(trainer_state, tmp / STATE_FILE)
        _write_manifest(tmp, run_id, step)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        _set_aside(final, run_id)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if keep > 0:
        _retain(run_dir, step, keep, run_id)
    return final


def _set_aside(final: Path, run_id: str | None) -> None:
    """Make room for a new checkpoint at an existing step directory without losing anything that is
    not this run's intact copy of the same step."""
    has_manifest, owner = _manifest_run_id(final)
    intact = has_manifest and owner == run_id
    if intact:
        try:
            verify_checkpoint(final)
        except CheckpointError:
            intact = False
    if intact:
        _delete(final)
        return
    kept = final.with_name(f"{final.name}.replaced-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
    os.replace(final, kept)
    _warn(f"{final}: not this run's intact checkpoint; moved to {kept.name} and kept", stacklevel=4)


def _retain(run_dir: str | os.PathLike, step: int, keep: int, run_id: str | None) -> None:
    own = []
    for ckpt in list_checkpoints(run_dir):
        has_manifest, owner = _manifest_run_id(ckpt)
        if has_manifest and owner == run_id and checkpoint_step(ckpt) <= step:
            own.append(ckpt)
    for old in own[:-keep]:
        _delete(old)


def _delete(ckpt: Path) -> None:
    """Remove a checkpoint by first renaming it to a temporary name: a kill during the removal then
    leaves a stale temporary directory (cleaned by `clean_stale_temps`), never a half-deleted
    checkpoint that is still listed."""
    doomed = ckpt.parent / f".tmp-{ckpt.name}-{_host()}-{os.getpid()}.old"
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(ckpt, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


# ------------------------------------------------------------------------------------------ load
def load_trainer_state(path: str | os.PathLike) -> dict:
    """The trainer state of a training checkpoint; CheckpointError when it is missing or unreadable."""
    file = Path(path) / STATE_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no {STATE_FILE}; this is a model checkpoint, not a training one")
    try:
        # numpy's array reconstruction is allowed for states written before rng_state() stored
        # plain tensors; anything else that would run pickled code is refused
        core = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core
        legacy_numpy = [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
        with torch.serialization.safe_globals(legacy_numpy):
            return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError, ... on bad bytes
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{file}: unreadable trainer state: truncated, corrupt or not plain data ({reason})"
        ) from e
