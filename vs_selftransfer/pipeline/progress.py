"""Progress of ``selftransfer upscale``: frames done / total, fps and ETA from vspipe's own progress lines, and
vspipe's other stderr lines kept for the error message."""
from __future__ import annotations

import collections
import re
import sys
import threading
import time


class Progress:
    """Frames done / total, fps and ETA on stderr: one rewritten line on a terminal, a line per 10% otherwise."""

    def __init__(self, total: int | None, stream=None):
        self.stream = stream or sys.stderr
        self.interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self.total = total
        self.done = 0
        self.first_frame_at: float | None = None  # rate is measured from the first frame, not from startup
        self.first_done = 0
        self._last_decile = -1
        self._last_draw = 0.0
        self._lock = threading.Lock()

    def indexing(self, percent: int) -> None:
        with self._lock:
            if self.interactive:
                self._draw(f"indexing source: {percent}%")

    def frames(self, done: int, total: int) -> None:
        with self._lock:
            now = time.monotonic()
            if self.first_frame_at is None:
                self.first_frame_at = now
                self.first_done = done
            self.done, self.total = done, total
            line = self.line(now)
            if self.interactive:
                if now - self._last_draw >= 0.2 or done == total:
                    self._draw(line)
            else:
                decile = done * 10 // max(total, 1)
                if decile > self._last_decile:
                    self._last_decile = decile
                    print(f"selftransfer upscale: {line}", file=self.stream, flush=True)

    def fps(self, now: float | None = None) -> float:
        if self.first_frame_at is None:
            return 0.0
        elapsed = (now or time.monotonic()) - self.first_frame_at
        return (self.done - self.first_done) / elapsed if elapsed > 0 else 0.0

    def line(self, now: float | None = None) -> str:
        fps = self.fps(now)
        total = self.total or 0
        eta = _clock((total - self.done) / fps) if fps > 0 and total else "?"
        pct = f" ({100 * self.done // total}%)" if total else ""
        return f"frames {self.done}/{total or '?'}{pct}, {fps:.2f} fps, ETA {eta}"

    def _draw(self, text: str) -> None:
        self._last_draw = time.monotonic()
        self.stream.write(f"\r{text}\x1b[K")
        self.stream.flush()

    def close(self) -> None:
        if self.interactive and self._last_draw:
            self.stream.write("\n")
            self.stream.flush()


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


_VSPIPE_FRAME = re.compile(r"Frame: (\d+)/(\d+)")
_VSPIPE_INDEX = re.compile(r"index progress (\d+)%")
_VSPIPE_DONE = re.compile(r"Output (\d+) frames in ")


def split_lines(chunks):
    """Whole lines from text chunks; CR ends a line too (vspipe's progress rewrites one line with CR)."""
    pending = ""
    for chunk in chunks:
        pending += chunk
        parts = re.split(r"\r\n|[\r\n]", pending)
        pending = parts.pop()
        yield from parts
    if pending:
        yield pending


def parse_vspipe_stderr(chunks, progress: Progress, tail: collections.deque) -> None:
    """Feed vspipe's progress lines to ``progress``; keep the other lines (errors) in ``tail``."""
    for line in split_lines(chunks):
        _vspipe_line(line, progress, tail)


def _vspipe_line(line: str, progress: Progress, tail: collections.deque) -> None:
    if m := _VSPIPE_FRAME.fullmatch(line.strip()):
        progress.frames(int(m.group(1)), int(m.group(2)))
    elif m := _VSPIPE_DONE.match(line.strip()):  # vspipe prints progress only now and then; this is the count
        progress.frames(int(m.group(1)), progress.total or int(m.group(1)))
    elif m := _VSPIPE_INDEX.search(line):
        progress.indexing(int(m.group(1)))
    elif line.strip():
        tail.append(line.rstrip())
