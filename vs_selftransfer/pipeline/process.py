"""Running ``vspipe | ffmpeg`` and keeping OUT safe.

Both children are supervised together: once one fails the other is killed, the error names the process that
failed by itself and quotes its last stderr lines, and both die with us (PR_SET_PDEATHSIG) even if we are
SIGKILLed. SIGTERM/SIGHUP unwind like Ctrl-C does.

Output safety: ffmpeg writes a new file of our own in OUT's folder (``PartialFile``), and only when vspipe *and*
ffmpeg both exit successfully is that file fsynced and linked or renamed to OUT. A failure, Ctrl-C or SIGTERM kills
both children and discards it; so does a SIGKILL, where the file is unnamed (Linux). A file named OUT therefore
always holds a finished encode, and no other file is ever written, truncated or removed.
"""
from __future__ import annotations

import collections
import errno
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from vs_selftransfer.errors import UserError
from vs_selftransfer.files import current_umask, fsync_dir
from vs_selftransfer.pipeline.progress import Progress, parse_vspipe_stderr, split_lines

PARTIAL_MARK = ".partial"
STDERR_TAIL_LINES = 25


# -- the pipeline -----------------------------------------------------------------------------------------------

class PipelineError(Exception):
    """vspipe or ffmpeg failed; the message names which and quotes its last stderr lines."""


class Terminated(BaseException):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def die_with_parent(parent_pid: int):
    """preexec_fn (Linux): the child gets SIGKILL when we die, even by SIGKILL, so no orphan keeps encoding."""
    if not sys.platform.startswith("linux"):
        return None

    def set_pdeathsig():
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent_pid:  # we died between fork and prctl
            os._exit(1)
    return set_pdeathsig


def run_pipeline(vspipe_cmd: list[str], ffmpeg_cmd: list[str], progress: Progress, *,
                 vspipe_environment: dict | None = None, ffmpeg_pass_fds: tuple[int, ...] = ()) -> None:
    """vspipe | ffmpeg. Raises PipelineError naming the process that failed first; kills both on any exit.
    ``ffmpeg_pass_fds``: open files ffmpeg inherits under the same numbers (its output)."""
    parent = os.getpid()
    vspipe = subprocess.Popen(vspipe_cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=vspipe_environment, preexec_fn=die_with_parent(parent))
    procs = [vspipe]
    killed: set[int] = set()
    try:
        ffmpeg = subprocess.Popen(ffmpeg_cmd, stdin=vspipe.stdout, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  pass_fds=ffmpeg_pass_fds, preexec_fn=die_with_parent(parent))
        procs.append(ffmpeg)
        vspipe.stdout.close()  # only ffmpeg holds the read end: if it dies, vspipe gets EPIPE instead of blocking
        vs_tail: collections.deque = collections.deque(maxlen=STDERR_TAIL_LINES)
        ff_tail: collections.deque = collections.deque(maxlen=STDERR_TAIL_LINES)
        readers = [
            threading.Thread(target=parse_vspipe_stderr, args=(_read_text(vspipe.stderr), progress, vs_tail),
                             daemon=True),
            threading.Thread(target=_collect_lines, args=(_read_text(ffmpeg.stderr), ff_tail), daemon=True),
        ]
        for t in readers:
            t.start()
        while any(p.poll() is None for p in procs):
            if any(p.returncode not in (None, 0) for p in procs):
                for other in procs:  # once one has failed, the other cannot produce anything useful
                    if other.poll() is None:
                        other.kill()
                        killed.add(other.pid)
            time.sleep(0.05)
        for t in readers:
            t.join(timeout=5)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                killed.add(p.pid)
            p.wait()
    _raise_on_failure(vspipe, ffmpeg, vs_tail, ff_tail, killed)


def _raise_on_failure(vspipe, ffmpeg, vs_tail, ff_tail, killed) -> None:
    """Blame the process that failed by itself: not one we killed, and not vspipe dying because ffmpeg went away
    (SIGPIPE, or "fwrite() call failed ... errno: 32" when SIGPIPE is ignored)."""
    def failed_by_itself(p):
        return p.returncode != 0 and p.pid not in killed

    vspipe_own = (failed_by_itself(vspipe) and vspipe.returncode != -signal.SIGPIPE
                  and not any("errno: 32" in line or "Broken pipe" in line for line in vs_tail))
    if vspipe_own:
        from vs_selftransfer import PLUGIN_HINT

        hint = f"\n({PLUGIN_HINT})" if plugin_missing("\n".join(vs_tail)) else ""
        raise PipelineError(f"vspipe failed ({exit_status(vspipe.returncode)}):\n{_indent(vs_tail)}{hint}")
    if failed_by_itself(ffmpeg):
        raise PipelineError(f"ffmpeg failed ({exit_status(ffmpeg.returncode)}):\n{_indent(ff_tail)}")
    if vspipe.returncode != 0 or ffmpeg.returncode != 0:
        raise PipelineError(f"vspipe {exit_status(vspipe.returncode)}, ffmpeg {exit_status(ffmpeg.returncode)}:\n"
                            f"{_indent([*vs_tail, *ff_tail])}")


def plugin_missing(vspipe_stderr: str) -> bool:
    return ("No attribute with the name selftransfer" in vspipe_stderr
            or "namespace named selftransfer" in vspipe_stderr)


def _collect_lines(chunks, tail: collections.deque) -> None:
    tail.extend(line.rstrip() for line in split_lines(chunks) if line.strip())


def _read_text(pipe):
    """Decoded chunks of a child's stderr as they come (not line-buffered: vspipe's progress ends in CR)."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    while chunk := os.read(pipe.fileno(), 65536):
        yield decoder.decode(chunk)
    yield decoder.decode(b"", final=True)


def exit_status(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def _indent(lines) -> str:
    return "\n".join(f"  {line}" for line in lines) or "  (no error output)"


def last_lines(text: str, n: int) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-n:])


# -- the partial output file ------------------------------------------------------------------------------

def _user_file_mode() -> int:
    """0666 less the umask: the mode any program gives a file it creates for the user."""
    return 0o666 & ~current_umask()


def _open_unnamed(directory_fd: int) -> int | None:
    """An unnamed regular file in the directory (Linux O_TMPFILE), or None where the system or file system has
    none. Reopened and linked through /proc/self/fd, so /proc must be there too."""
    if not hasattr(os, "O_TMPFILE") or not os.path.isdir("/proc/self/fd"):
        return None
    try:
        return os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, _user_file_mode(), dir_fd=directory_fd)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):  # no O_TMPFILE on this file system
            return None
        raise


class PartialFile:
    """Where ffmpeg writes until the encode is complete: a new file of our own in OUT's folder, which no path that
    exists before the run (a planted symlink, a file of the same name, the input itself) can redirect, and which
    becomes OUT only by ``commit``, a link or rename of that same file. Nothing else in the folder is opened,
    truncated or removed.

    On Linux it is an unnamed file (O_TMPFILE) that ffmpeg writes through ``/proc/self/fd/N``, the open file rather
    than a name, and that a SIGKILL leaves nowhere. Elsewhere, or on a file system without O_TMPFILE, it is
    ``.<OUT name>.<random>.partial<OUT suffix>``, created by mkstemp (O_CREAT|O_EXCL|O_NOFOLLOW): a SIGKILLed run
    leaves that behind, named for what it is.

    Without ``force`` the commit never replaces a file: an OUT that appeared during the encode (another run) is
    kept and this encode is discarded with an error."""

    def __init__(self, out: Path, *, force: bool):
        self.out, self.force = out, force
        self.committed = False
        self.path: Path | None = None  # the fallback's name, None while the file has no name
        folder = out.parent if str(out.parent) else Path(".")
        try:
            self.dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise UserError(f"--output {out}: cannot write in {folder}: {e.strerror}") from None
        try:
            fd = _open_unnamed(self.dir_fd)
            if fd is None:
                fd, name = tempfile.mkstemp(dir=folder, prefix=f".{out.name}.", suffix=f"{PARTIAL_MARK}{out.suffix}")
                self.path = Path(name)
                os.fchmod(fd, _user_file_mode())  # a video like any other, not mkstemp's private 0600
        except OSError as e:
            os.close(self.dir_fd)
            raise UserError(f"--output {out}: cannot write in {folder}: {e.strerror}") from None
        self.fd = fd
        # ffmpeg writes the open file itself where /proc shows it (it inherits the descriptor under the same number
        # through ``pass_fds``), so not even a name swapped in during the run can redirect it; else the name.
        by_descriptor = self.path is None or os.path.isdir("/proc/self/fd")
        self.pass_fds = (fd,) if by_descriptor else ()
        self.ffmpeg_target = f"/proc/self/fd/{fd}" if by_descriptor else str(self.path)

    def commit(self) -> None:
        """Make the finished file OUT. A rename or link replaces a symlink at OUT; it never writes through one."""
        os.fsync(self.fd)  # the inode ffmpeg wrote (it opened it with O_TRUNC; it cannot have replaced it)
        name = self.out.name
        if self.path is None:
            source = f"/proc/self/fd/{self.fd}"  # linked with AT_SYMLINK_FOLLOW (os.link uses linkat with a dir_fd)
            if self.force:
                temp = _link_to_fresh_name(source, self.dir_fd, f".{name}.", f".new{self.out.suffix}")
                os.replace(temp, name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
            else:
                self._link_exclusively(source)
        elif self.force:
            os.replace(self.path.name, name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
        else:
            try:
                self._link_exclusively(self.path.name)
                os.unlink(self.path.name, dir_fd=self.dir_fd)
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK):
                    raise
                # No hard links here (FAT, exFAT): a rename, unless OUT is there now (the check and the rename
                # are two steps: another run could slip in between).
                if os.path.lexists(self.out):
                    self._appeared()
                os.replace(self.path.name, name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
        self.committed = True
        fsync_dir(self.dir_fd)

    def _link_exclusively(self, source: str) -> None:
        try:
            os.link(source, self.out.name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd, follow_symlinks=True)
        except FileExistsError:
            self._appeared()

    def _appeared(self):
        raise UserError(f"--output {self.out}: appeared while this run was encoding (another run?); it is left as "
                        f"it is and this encode is discarded; pass --force to replace it")

    def close(self) -> None:
        if self.path is not None and not self.committed:
            try:  # remove our name only while it still is our file
                if _same_inode(os.stat(self.path.name, dir_fd=self.dir_fd, follow_symlinks=False), os.fstat(self.fd)):
                    os.unlink(self.path.name, dir_fd=self.dir_fd)
            except FileNotFoundError:
                pass
        os.close(self.fd)
        os.close(self.dir_fd)


def _link_to_fresh_name(source: str, dir_fd: int, prefix: str, suffix: str) -> str:
    """Link ``source`` to a new random name in ``dir_fd`` (a link never replaces: a taken name is retried)."""
    for _ in range(100):
        name = f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            os.link(source, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=True)
            return name
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {prefix}…{suffix}")


def _same_inode(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


# -- termination ------------------------------------------------------------------------------------------------

def trap_termination() -> dict:
    """SIGTERM/SIGHUP unwind like Ctrl-C does (KeyboardInterrupt), so children die and the partial file goes."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(signum, frame):
        raise Terminated(signum)

    signals = [signal.SIGTERM, *([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])]
    return {sig: signal.signal(sig, handler) for sig in signals}


def restore_handlers(previous: dict) -> None:
    for sig, old in previous.items():
        signal.signal(sig, old)
