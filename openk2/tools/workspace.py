"""One workspace per session (episode, agent run): a directory with a disk quota, its own sandbox uid,
a lock that serialises the calls made in it, and file access that never follows a path the sandboxed
code can change.

Why each piece exists:
- Quota: as root the workspace is a tmpfs of `quota_mb` mounted on a fresh directory, so a full disk
  is the workspace's own (ENOSPC inside, nothing outside), and hard links out of it fail (EXDEV).
  Without root there is no quota (and no isolation: see `sandbox.require_isolation`).
- Directory fd: the workspace is opened once, at creation, with O_NOFOLLOW; every host-side file
  operation walks from that fd one component at a time with O_NOFOLLOW (openat), refuses `..`,
  absolute paths and symlinks, and works on the opened file descriptor afterwards. Sandboxed code can
  swap files and plant symlinks at any moment; the host never resolves a path it could have changed.
- Uid: every process of the session runs as the session's uid, so `close()` can find and kill all
  of them (the persistent interpreter, anything it left running).
- Lock: tools of one session run one at a time (`with ws.lock:`); sessions never share a workspace.
"""

from __future__ import annotations

import itertools
import os
import shutil
import stat
import tempfile
import threading
from pathlib import Path

from openk2.tools import launcher, sandbox

DEFAULT_QUOTA_MB = 256
MAX_ENTRIES = 500
MAX_DEPTH = 32  # list_files does not descend further (a deep chain of directories costs fds and time)

_uids = itertools.count()
_uid_lock = threading.Lock()


def _next_uid() -> int:
    """A uid no other live session of this host uses: the pid spreads processes apart."""
    with _uid_lock:
        n = next(_uids)
    return sandbox.UID_BASE + (os.getpid() % 16384) * 4096 + n % 4096


def _copy_regular(src: str, dst: str) -> None:
    """Copy a regular file; skip FIFOs, sockets and devices (opening a FIFO would block the host)."""
    try:
        fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return
        os.set_blocking(fd, True)
        with open(dst, "xb") as out:
            shutil.copyfileobj(f, out)


class WorkspaceError(ValueError):
    """A file operation was refused (bad path, symlink, not a regular file, too large)."""


def split_relative(path: str) -> list[str]:
    """The components of a workspace-relative path; refuses absolute paths, `..`, NUL and empties."""
    if not isinstance(path, str) or not path.strip():
        raise WorkspaceError("path must be a non-empty string relative to the workspace")
    if "\0" in path:
        raise WorkspaceError("path contains a NUL byte")
    if path.startswith("/"):
        raise WorkspaceError(f"path {path!r} is absolute; give it relative to the workspace")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise WorkspaceError(f"path {path!r} leaves the workspace")
    return parts


class Workspace:
    """with Workspace() as ws: ws.write_text("a.txt", "hi"); ws.read_text("a.txt")"""

    def __init__(
        self,
        quota_mb: int = DEFAULT_QUOTA_MB,
        keep: bool = False,
        prefix: str = "openk2-ws-",
        path: str | os.PathLike | None = None,
    ):
        """A fresh workspace (a tmpfs of quota_mb when root), or with `path` an existing directory
        adopted as one: no quota, never removed, and handed to the session's uid (files already in it
        keep their owner, so the sandbox can read but not change root-owned ones)."""
        if quota_mb <= 0:
            raise ValueError(f"quota_mb must be positive, got {quota_mb}")
        self.quota_mb = quota_mb
        self.keep = keep or path is not None
        self.uid = _next_uid()
        self.lock = threading.RLock()
        self.mounted = False
        self.closed = False
        if path is not None:
            self.path = Path(path).resolve()
            if not self.path.is_dir():
                raise ValueError(f"workspace {self.path} is not a directory")
        else:
            self.path = Path(tempfile.mkdtemp(prefix=prefix))
            if os.geteuid() == 0:
                libc, ctypes = launcher.load_libc()
                opts = f"size={quota_mb}m,mode=0700,uid={self.uid},gid={self.uid}"
                flags = launcher.MS_NOSUID | launcher.MS_NODEV
                try:
                    launcher.mount(libc, ctypes, "tmpfs", str(self.path), "tmpfs", flags, opts)
                    self.mounted = True
                except OSError:  # root without CAP_SYS_ADMIN: a plain directory, no quota
                    pass
        self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        if not self.mounted and os.geteuid() == 0:
            os.fchown(self.fd, self.uid, self.uid)

    # -- lifetime -------------------------------------------------------------------------------------

    def __enter__(self) -> Workspace:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Kill every process of the session; remove the workspace unless `keep`."""
        if self.closed:
            return
        self.closed = True
        if os.geteuid() == 0:
            sandbox.kill_uid(self.uid)
        os.close(self.fd)
        if self.keep and self.mounted:
            # Nothing of the session runs any more, so the tree is still: copy it (symlinks as symlinks,
            # never followed) to a plain directory, and release the tmpfs.
            kept = Path(tempfile.mkdtemp(prefix="openk2-kept-"))
            shutil.copytree(self.path, kept, symlinks=True, dirs_exist_ok=True, copy_function=_copy_regular)
            self._unmount()
            self.path = kept
            return
        if self.keep:
            return
        if self.mounted:
            self._unmount()
        else:
            shutil.rmtree(self.path, ignore_errors=True)  # fd-based on Linux: safe against symlinks

    def _unmount(self) -> None:
        libc, _ = launcher.load_libc()
        libc.umount2(os.fsencode(self.path), 2)  # MNT_DETACH: the tmpfs and its contents are gone
        os.rmdir(self.path)

    # -- safe file access -----------------------------------------------------------------------------

    def _open_dir(self, parts: list[str], create: bool = False) -> int:
        """An fd of the directory reached by walking `parts` from the workspace with O_NOFOLLOW."""
        fd = os.dup(self.fd)
        try:
            for name in parts:
                try:
                    nxt = os.open(
                        name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd
                    )
                except FileNotFoundError:
                    if not create:
                        raise WorkspaceError(f"no such directory: {name}") from None
                    os.mkdir(name, 0o755, dir_fd=fd)
                    nxt = os.open(
                        name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd
                    )
                    if os.geteuid() == 0:
                        os.fchown(nxt, self.uid, self.uid)
                except (NotADirectoryError, OSError) as e:
                    raise WorkspaceError(
                        f"{name!r} is not a directory (or is a symlink): {e.strerror}"
                    ) from None
                os.close(fd)
                fd = nxt
            return fd
        except BaseException:
            os.close(fd)
            raise

    def _open_file(self, path: str, flags: int, create: bool = False) -> int:
        parts = split_relative(path)
        if not parts:
            raise WorkspaceError(f"path {path!r} names the workspace itself, not a file")
        dfd = self._open_dir(parts[:-1], create=create)
        try:
            extra = os.O_CREAT if create else 0
            try:
                fd = os.open(
                    parts[-1], flags | extra | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644, dir_fd=dfd
                )
            except FileNotFoundError:
                raise WorkspaceError(f"no such file: {path}") from None
            except OSError as e:
                raise WorkspaceError(
                    f"cannot open {path!r} (symlink or special file?): {e.strerror}"
                ) from None
        finally:
            os.close(dfd)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise WorkspaceError(f"{path!r} is not a regular file")
        os.set_blocking(fd, True)
        if create and os.geteuid() == 0 and st.st_uid != self.uid:
            os.fchown(fd, self.uid, self.uid)
        return fd

    def read_bytes(self, path: str, limit: int | None = None) -> bytes:
        fd = self._open_file(path, os.O_RDONLY)
        with os.fdopen(fd, "rb") as f:
            return f.read(limit) if limit is not None else f.read()

    def read_text(self, path: str, limit: int | None = None) -> str:
        return self.read_bytes(path, limit).decode("utf-8", "replace")

    def write_bytes(self, path: str, data: bytes) -> int:
        fd = self._open_file(path, os.O_WRONLY, create=True)
        with os.fdopen(fd, "wb") as f:
            f.truncate(0)
            f.write(data)
        return len(data)

    def write_text(self, path: str, text: str) -> int:
        return self.write_bytes(path, text.encode())

    def edit_text(self, path: str, old: str, new: str) -> int:
        """Replace the one occurrence of `old` with `new` in a file, in place on the opened inode."""
        fd = self._open_file(path, os.O_RDWR)
        with os.fdopen(fd, "r+b") as f:
            text = f.read().decode("utf-8", "replace")
            count = text.count(old) if old else 0
            if count != 1:
                raise WorkspaceError(
                    f"the text to replace occurs {count} times in {path}; it must occur once"
                )
            data = text.replace(old, new).encode()
            f.seek(0)
            f.truncate(0)
            f.write(data)
        return len(data)

    def list_files(self, path: str = ".", limit: int = MAX_ENTRIES) -> list[str]:
        """Relative paths of the regular files under a directory (symlinks are listed, never followed)."""
        parts = split_relative(path) if path not in (".", "") else []
        out: list[str] = []

        def walk(fd: int, prefix: str, depth: int = 0) -> None:
            if depth > MAX_DEPTH:
                out.append(prefix + "... (deeper directories not listed)")
                return
            with os.scandir(fd) as it:
                entries = sorted(itertools.islice(it, 10 * limit), key=lambda e: e.name)
            for e in entries:
                if len(out) >= limit:
                    return
                rel = f"{prefix}{e.name}"
                if e.is_dir(follow_symlinks=False):
                    try:
                        sub = os.open(
                            e.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd
                        )
                    except OSError:
                        continue
                    try:
                        walk(sub, rel + "/", depth + 1)
                    finally:
                        os.close(sub)
                elif e.is_symlink():
                    out.append(rel + " (symlink)")
                else:
                    out.append(rel)

        root = self._open_dir(parts)
        try:
            walk(root, "/".join(parts) + "/" if parts else "")
        finally:
            os.close(root)
        return out

    def usage_bytes(self) -> int:
        st = os.fstatvfs(self.fd)
        return (st.f_blocks - st.f_bfree) * st.f_frsize

    # -- running code ---------------------------------------------------------------------------------

    def spawn(
        self,
        argv: list[str],
        limits: sandbox.SandboxLimits,
        env: dict[str, str] | None = None,
        allow_unisolated: bool = False,
    ):
        """Start a long-lived sandboxed process in this workspace (the caller stops it)."""
        if self.closed:
            raise WorkspaceError("the workspace is closed")
        return sandbox.launch(
            argv,
            workspace_fd=self.fd,
            host_path=str(self.path),
            uid=self.uid,
            limits=limits,
            env=env,
            allow_unisolated=allow_unisolated,
        )

    def run(
        self,
        argv: list[str],
        *,
        limits: sandbox.SandboxLimits = sandbox.SandboxLimits(),
        stdin: str | bytes | None = None,
        env: dict[str, str] | None = None,
        allow_unisolated: bool = False,
    ) -> sandbox.SandboxResult:
        """Run argv to completion in the sandbox with this workspace as cwd; stdin goes through a pipe."""
        data = stdin.encode() if isinstance(stdin, str) else (stdin or b"")
        with self.lock:
            proc = self.spawn(argv, limits, env, allow_unisolated)
            return sandbox.supervise(proc, data, limits)


def run_command(
    argv: list[str],
    *,
    limits: sandbox.SandboxLimits = sandbox.SandboxLimits(),
    workspace: Workspace | None = None,
    stdin: str | None = None,
    env: dict[str, str] | None = None,
    files: dict[str, str] | None = None,
    allow_unisolated: bool = False,
) -> sandbox.SandboxResult:
    """Run argv in `workspace`, or in a fresh one removed afterwards; `files` are written in first."""
    if not argv or not all(isinstance(a, str) for a in argv):
        raise ValueError(f"argv must be a non-empty list of strings, got {argv!r}")
    ws = workspace if workspace is not None else Workspace(quota_mb=max(64, 4 * limits.file_size_mb))
    try:
        for name, text in (files or {}).items():
            ws.write_text(name, text)
        return ws.run(argv, limits=limits, stdin=stdin, env=env, allow_unisolated=allow_unisolated)
    finally:
        if workspace is None:
            ws.close()


def run_python(
    code: str,
    *,
    limits: sandbox.SandboxLimits = sandbox.SandboxLimits(),
    workspace: Workspace | None = None,
    stdin: str | None = None,
    env: dict[str, str] | None = None,
    files: dict[str, str] | None = None,
    allow_unisolated: bool = False,
) -> sandbox.SandboxResult:
    """Run Python source to completion. The code travels through the interpreter's argv (`-c`): no
    file is planted in the workspace and the host never reads one back."""
    if not isinstance(code, str):
        raise TypeError(f"code must be str, got {type(code).__name__}")
    import sys

    argv = [sys.executable, "-I", "-B", "-c", code]
    return run_command(
        argv,
        limits=limits,
        workspace=workspace,
        stdin=stdin,
        env=env,
        files=files,
        allow_unisolated=allow_unisolated,
    )
