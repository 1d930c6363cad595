"""File helpers both phases use: the one file hash, durable atomic writes, and output-path checks made before
any work is done."""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from vs_selftransfer.errors import UserError


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    # The one file hash (weights, videos, bundles): lives here so that reading videos does not import torch.
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` so that ``path`` is either absent/old or complete: temp file, fsync, rename, fsync dir."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent or ".", prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename in ``directory`` durable: without it a crash can forget the new name."""
    dfd = os.open(os.fspath(directory) or ".", os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def check_output_path(path: str | os.PathLike, force: bool = False) -> Path:
    """Validate an output file path before any work is done: refuse an existing file without ``force``, a
    directory, a missing or non-writable parent directory. Returns the path."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{p}: is a directory; give an output file path (e.g. {p / 'out'}{p.suffix})")
    if p.exists() and not force:
        raise UserError(f"{p}: already exists; pass --force to overwrite it, or choose another output path")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.exists():
        raise UserError(f"{p}: the output folder {parent} does not exist; create it first")
    if not parent.is_dir():
        raise UserError(f"{p}: {parent} is not a folder")
    # Try it: permission bits do not tell the whole story (root, read-only mounts, ACLs).
    try:
        fd, probe_file = tempfile.mkstemp(dir=parent, prefix=f".{p.name}.", suffix=".probe")
    except OSError as e:
        raise UserError(f"{p}: cannot write in the output folder {parent} ({e.strerror or e}); "
                        f"choose a writable location") from None
    os.close(fd)
    os.unlink(probe_file)
    return p
