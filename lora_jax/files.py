"""The one owner of atomic file writes: a temporary file beside the target, then a rename, so a kill
leaves the old file whole or the new one, never half of either."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def write_via(path: Path, write: Callable[[Path], None], *, tmp_suffix: str | None = None) -> None:
    """``write(tmp)`` then rename ``tmp`` over ``path``. ``tmp_suffix``: the temporary file's suffix, for
    writers that pick a format by it (matplotlib); by default ``<name>.tmp``."""
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp" + tmp_suffix if tmp_suffix else path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def write_bytes(path: Path, data: bytes) -> None:
    write_via(path, lambda tmp: tmp.write_bytes(data))


def write_text(path: Path, text: str) -> None:
    write_via(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: Path, obj) -> None:
    """Indented JSON; values JSON lacks (paths, dtypes) written as their ``str``."""
    write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def save_figure(fig, path: Path, dpi: int = 110) -> None:
    """A matplotlib figure (its format from ``path``'s suffix)."""
    write_via(path, lambda tmp: fig.savefig(tmp, dpi=dpi), tmp_suffix=Path(path).suffix)


def check_writable(directory: Path) -> None:
    """Create and remove a file in ``directory``: proof, before any work, that outputs can land there.
    Raises OSError (missing directory, no permission, read-only mount, /proc)."""
    fd, probe = tempfile.mkstemp(dir=directory, prefix=".write-check-")
    os.close(fd)
    os.unlink(probe)


def write_dir(path: Path, fill: Callable[[Path], None], *, overwrite: bool = False) -> None:
    """``fill(tmp)`` into a new directory beside ``path``, then rename it to ``path``: a kill leaves no
    half-written directory under the name. An existing ``path`` is replaced only with ``overwrite``
    (raises FileExistsError otherwise), and only once the new one is complete."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        fill(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
