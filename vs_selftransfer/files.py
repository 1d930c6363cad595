"""File helpers both phases use: the one file hash, durable atomic writes, and output-path checks made before
any work is done."""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from vs_selftransfer.errors import UserError


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    # The one file hash (weights, videos, bundles): lives here so that reading videos does not import torch.
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path (``.NAME.XXXX.tmp``, in ``path``'s folder) to write ``path``'s content to, e.g. for a
    library that opens the file itself (h5py). When the block ends without an error the file is fsynced and renamed
    to ``path`` durably (directory fsynced too); on an error it is removed. So ``path`` is either absent/old or
    complete."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent or ".", prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates 0600; the result gets the mode of any file the user writes (0666 & ~umask), so that
        # others in the group can read a bundle or a report they were handed.
        os.fchmod(fd, 0o666 & ~current_umask())
    finally:
        os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def current_umask() -> int:
    """This process's umask, read without changing it (os.umask can only be read by setting it, which races with
    other threads creating files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` so that ``path`` is either absent/old or complete (``atomic_path``)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def fsync_dir(directory: str | os.PathLike | int) -> None:
    """Make a rename or link in ``directory`` (a path, or a directory file descriptor the caller keeps) durable:
    without it a crash can forget the new name."""
    if isinstance(directory, int):
        os.fsync(directory)
        return
    dfd = os.open(os.fspath(directory) or ".", os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def check_output_path(path: str | os.PathLike, force: bool = False, *, inputs=(), flag: str = "--output") -> Path:
    """Validate an output file path before any work is done: refuse a directory, one of the command's ``inputs``
    (see ``check_not_an_input``; ``--force`` or not), an existing file or symlink without ``force``, a missing or
    non-writable parent directory. ``flag`` is the option the user gave the path with. Returns the path."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{flag} {p}: is a directory; give an output file path (e.g. {p / 'out'}{p.suffix})")
    check_not_an_input(p, inputs, flag)
    if os.path.lexists(p) and not force:
        raise UserError(f"{flag} {p}: already exists; pass --force to overwrite it, or choose another output path")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.exists():
        raise UserError(f"{flag} {p}: the output directory does not exist: {parent}; create it first")
    if not parent.is_dir():
        raise UserError(f"{flag} {p}: {parent} is not a directory")
    # Try it: permission bits do not tell the whole story (root, read-only mounts, ACLs).
    try:
        fd, probe_file = tempfile.mkstemp(dir=parent, prefix=f".{p.name}.", suffix=".probe")
    except OSError as e:
        raise UserError(f"{flag} {p}: cannot write in the output directory {parent} ({e.strerror or e}); "
                        f"choose a writable location") from None
    os.close(fd)
    os.unlink(probe_file)
    return p


def check_not_an_input(output: str | os.PathLike, inputs, flag: str = "--output") -> None:
    """Refuse an output that is one of ``inputs`` (paths; None and missing ones are skipped): the same path, a
    symlink or hard link to it (the same file), or an existing directory that holds it (a command that replaces
    a directory output would delete it). Writing there would destroy the input, so ``--force`` does not help."""
    out = Path(output)
    if not os.path.lexists(out):
        return
    out_real = os.path.realpath(out)
    for given in inputs:
        if given is None or not os.path.exists(given):
            continue
        if os.path.exists(out) and os.path.samefile(out, given):
            if out.is_symlink():
                how = " (a symlink to it)"
            elif out_real != os.path.realpath(given) and os.stat(out).st_nlink > 1:
                how = " (a hard link to it)"
            else:
                how = ""
            raise UserError(f"{flag} {out}: is the input {given}{how}; writing it would destroy the input, "
                            f"--force or not: choose another output path")
        if out.is_dir() and os.path.commonpath([out_real, os.path.realpath(given)]) == out_real:
            raise UserError(f"{flag} {out}: holds the input {given}, which replacing {out} would delete, "
                            f"--force or not: choose another output path")
