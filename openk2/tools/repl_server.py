"""The persistent interpreter's inside half: runs in the sandbox (its source is passed with `python -c`),
stdlib only. One JSON request per line on stdin, one JSON reply per line on the original stdout.

Requests: {"code": str} runs code in the session's namespace, IPython style (the value of a final
expression is printed); {"plot": str, "path": str} runs plotting code with matplotlib's Agg backend,
saves the current figure to path (inside the workspace) and describes it. The code's own stdout and
stderr go to memory files (memfd), so nothing it prints can be mistaken for a reply; whatever it writes
to the reply channel deliberately is still only data to the host.
"""

import ast
import json
import os
import sys
import traceback

MAX_OUT = 64_000


def _read_fd(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    data = os.read(fd, MAX_OUT + 1)
    text = data[:MAX_OUT].decode("utf-8", "replace")
    return text + ("\n[output truncated]" if len(data) > MAX_OUT else "")


def _run(code: str, ns: dict) -> None:
    tree = ast.parse(code, "<cell>", "exec")
    last = tree.body[-1] if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    if last is not None:
        tree.body.pop()
    exec(compile(tree, "<cell>", "exec"), ns)
    if last is not None:
        value = eval(compile(ast.Expression(last.value), "<cell>", "eval"), ns)
        if value is not None:
            print(repr(value))


def _describe_figure(fig) -> str:
    parts = []
    for i, ax in enumerate(fig.get_axes()):
        bits = []
        if ax.get_title():
            bits.append(f"title {ax.get_title()!r}")
        if ax.get_xlabel() or ax.get_ylabel():
            bits.append(f"x {ax.get_xlabel()!r}, y {ax.get_ylabel()!r}")
        if ax.lines:
            bits.append(f"{len(ax.lines)} line(s)")
        if ax.patches:
            bits.append(f"{len(ax.patches)} bar(s)/patch(es)")
        if ax.collections:
            bits.append(f"{len(ax.collections)} scatter/collection(s)")
        labels = [t.get_text() for t in (ax.get_legend().get_texts() if ax.get_legend() else [])]
        if labels:
            bits.append(f"legend {labels}")
        parts.append(f"axes {i + 1}: " + (", ".join(bits) or "empty"))
    w, h = fig.get_size_inches() * fig.dpi
    return f"{int(w)}x{int(h)} px figure; " + "; ".join(parts or ["no axes"])


def _plot(code: str, path: str, ns: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns.setdefault("plt", plt)
    plt.close("all")
    _run(code, ns)
    fig = plt.gcf()
    if not fig.get_axes():
        raise ValueError("the code drew nothing (no axes on the current figure)")
    fig.savefig(path, format="png")
    description = _describe_figure(fig)
    plt.close("all")
    return description


def main() -> None:
    replies = os.fdopen(os.dup(1), "w", encoding="utf-8")
    requests = os.fdopen(os.dup(0), "r", encoding="utf-8")
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    ns = {"__name__": "__main__", "__builtins__": __builtins__}
    for line in requests:
        req = json.loads(line)
        out_fd, err_fd = os.memfd_create("stdout"), os.memfd_create("stderr")
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(out_fd, 1)
        os.dup2(err_fd, 2)
        reply = {"ok": True}
        try:
            if "plot" in req:
                path = req["path"]
                if not isinstance(path, str) or path.startswith("/") or ".." in path.split("/"):
                    raise ValueError("path must be relative to the workspace")
                reply["description"] = _plot(req["plot"], path, ns)
                reply["path"] = path
            else:
                _run(req["code"], ns)
        except BaseException as e:  # noqa: BLE001 - SystemExit and KeyboardInterrupt are reported too
            reply["ok"] = False
            tb = traceback.format_exception(type(e), e, e.__traceback__)
            sys.stderr.write(
                "".join(line for line in tb if "repl_server" not in line and "<string>" not in line)
            )
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
        reply["stdout"], reply["stderr"] = _read_fd(out_fd), _read_fd(err_fd)
        os.close(out_fd)
        os.close(err_fd)
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


main()
