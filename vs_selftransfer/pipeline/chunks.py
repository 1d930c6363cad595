"""Chunked upscaling, the part that needs no cluster: split a video into chunks, render one chunk exactly as the
one-process run renders those frames, keep finished chunks across runs, and join them without re-encoding.

- **Planning.** Chunks end at source keyframes where one falls in the second half of the length limit: a chunk
  that starts on a keyframe costs no decoding before its first frame, and encoders put keyframes at scene cuts, so
  the encoder's forced IDR at a chunk start usually lands where it would have put one anyway. Where a GOP is
  longer than the limit the chunk ends inside it: BestSource is frame-accurate, so the first frame of the next
  chunk is the same frame whatever keyframe its decoder starts from. (No scene detection of our own: that is a
  decode of the whole film before the first chunk starts, for what the source's keyframes mostly give already.)
- **Rendering.** ``vspipe -c y4m -s START -e END`` on the same generated .vpy as ``selftransfer upscale`` (the
  filter, its options and the BestSource decode are the one-process path's), encoded by ffmpeg with the same
  encoder options into a video-only Matroska file. y4m is constant-rate, so a chunk's timestamps are its frame
  numbers at the clip's rate, as in the one-process run (variable-rate sources come out constant-rate in both).
  Each chunk is its own encode, so x264/x265 start it with an IDR picture: closed GOPs at every chunk start.
- **Store.** Finished chunks live in ``.OUT.chunks/`` beside OUT with a manifest: the job's key (selftransfer
  version, source and bundle sha256, filter and encoder options, frame count) and each chunk's frame range and
  sha256. A rerun of the same job reuses every chunk whose file still has its recorded hash; a different job
  empties the folder first. Chunk files and the manifest are written atomically, so a kill at any moment leaves
  either a chunk that verifies or none.
- **Join.** The concat demuxer stitches the chunks' packets (stream copy, no re-encode) and the pipeline's own
  muxing command adds the source's audio, subtitles, chapters and metadata once, into the partial file that
  becomes OUT.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

from vs_selftransfer.errors import UserError
from vs_selftransfer.files import atomic_write, fsync_dir, sha256_file
from vs_selftransfer.pipeline.media import find_tools, vspipe_env
from vs_selftransfer.pipeline.options import FilterOptions
from vs_selftransfer.pipeline.process import (PipelineError, die_with_parent, exit_status, last_lines, plugin_missing,
                                              run_pipeline)
from vs_selftransfer.pipeline.script import build_script

DEFAULT_CHUNK_FRAMES = 1000
CHUNK_CONTAINER = "matroska"  # stores FFV1, H.264 and HEVC with exact frame timestamps for the concat demuxer
STORE_FORMAT = 1
MANIFEST_NAME = "manifest.json"
CONCAT_LIST_NAME = "concat.txt"
LOCK_NAME = "lock"


# -- planning ---------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, order=True)
class Chunk:
    start: int  # first frame (presentation order, 0-based)
    end: int  # one past the last frame

    @property
    def frames(self) -> int:
        return self.end - self.start

    @property
    def name(self) -> str:
        return f"chunk-{self.start:08d}-{self.end:08d}.mkv"

    @property
    def key(self) -> str:
        return f"{self.start}-{self.end}"


def plan_chunks(frames: int, keyframes: tuple[int, ...] | list[int], max_frames: int) -> list[Chunk]:
    """Cover frames 0..frames-1 with consecutive chunks of at most ``max_frames``. Each chunk ends at the last
    keyframe in the second half of its window when there is one, else at the window's end (inside a GOP)."""
    if frames < 1 or max_frames < 1:
        raise ValueError("plan_chunks needs frames >= 1 and max_frames >= 1")
    keys = sorted(set(k for k in keyframes if 0 < k < frames))
    chunks, start = [], 0
    while start < frames:
        limit = start + max_frames
        if limit >= frames:
            end = frames
        else:
            inside = [k for k in keys if start + max(1, max_frames // 2) <= k <= limit]
            end = inside[-1] if inside else limit
        chunks.append(Chunk(start, end))
        start = end
    return chunks


# -- the job ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ChunkJob:
    """Everything a worker needs to render any chunk of one upscale, and the identity finished chunks are kept
    under. Paths are the driver's: workers use them only where the same file is there (shared storage, or the
    driver's own machine), else they get content-addressed copies (see ``cluster``)."""
    version: str
    source_path: str
    source_size: int
    source_sha256: str
    bundle_path: str
    bundle_size: int
    bundle_sha256: str
    options: FilterOptions
    video_args: tuple[str, ...]  # the chunk encoder's ffmpeg options: encoder, colour tags, --ffmpeg-args
    frames: int  # in the whole clip

    def key(self) -> str:
        """sha256 of what decides a chunk's bytes; paths, sizes and the chunk plan are not part of it."""
        identity = {"version": self.version, "source_sha256": self.source_sha256,
                    "bundle_sha256": self.bundle_sha256, "filter": self.options.plugin_kwargs(),
                    "video_args": list(self.video_args), "frames": self.frames, "container": CHUNK_CONTAINER}
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()

    def summary(self) -> dict:
        return {"source": self.source_path, "source_sha256": self.source_sha256, "bundle": self.bundle_path,
                "bundle_sha256": self.bundle_sha256, "filter": self.options.plugin_kwargs(),
                "video_args": list(self.video_args), "frames": self.frames, "selftransfer": self.version}


# -- rendering one chunk ----------------------------------------------------------------------------------------

def chunk_script(job: ChunkJob, source: Path, bundle: Path) -> str:
    """The .vpy of the one-process run, pointing at this machine's copies. BestSource keeps its index in the
    cache (every chunk opens the source again; indexing a film once per chunk would cost more than rendering)."""
    return build_script(source, bundle, job.options, index_cache=True)


def script_frames(vspipe: str, script: Path) -> int:
    """The clip length vspipe sees (evaluates the script: opens and, the first time, indexes the source)."""
    done = subprocess.run([vspipe, "--info", str(script), "-"], stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, errors="replace", env=vspipe_env())
    if done.returncode != 0:
        from vs_selftransfer import PLUGIN_HINT

        reason = PLUGIN_HINT if plugin_missing(done.stderr) else last_lines(done.stderr, 5)
        raise PipelineError(f"vspipe cannot evaluate the chunk script ({exit_status(done.returncode)}): {reason}")
    for line in done.stdout.splitlines():
        if line.startswith("Frames:"):
            return int(line.split(":", 1)[1])
    raise PipelineError(f"vspipe --info printed no frame count: {last_lines(done.stdout, 3)}")


def render_chunk(job: ChunkJob, chunk: Chunk, script: Path, output: Path, progress) -> None:
    """vspipe -s/-e | ffmpeg for one chunk into ``output`` (video only). ``progress`` takes the chunk's
    ``frames(done, total)`` and ``indexing(percent)`` like the pipeline's Progress. Raises PipelineError if either
    process fails or the file does not hold exactly the chunk's frames."""
    tools = find_tools()
    vspipe_cmd = [tools.vspipe, "-c", "y4m", "-p", "-s", str(chunk.start), "-e", str(chunk.end - 1), str(script),
                  "-"]
    ffmpeg_cmd = [tools.ffmpeg, "-hide_banner", "-nostdin", "-nostats", "-loglevel", "error",
                  "-f", "yuv4mpegpipe", "-i", "pipe:0", "-map", "0:v:0", *job.video_args,
                  "-f", CHUNK_CONTAINER, "-y", str(output)]
    run_pipeline(vspipe_cmd, ffmpeg_cmd, progress, vspipe_environment=vspipe_env())
    packets = count_video_packets(tools.ffprobe, output)
    if packets != chunk.frames:
        raise PipelineError(f"chunk {chunk.start}..{chunk.end - 1}: the encode holds {packets} frames, not "
                            f"{chunk.frames}")


def count_video_packets(ffprobe: str, path: Path) -> int:
    done = subprocess.run([ffprobe, "-v", "error", "-select_streams", "v:0", "-count_packets", "-show_entries",
                           "stream=nb_read_packets", "-of", "csv=p=0", str(path)], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, errors="replace")
    if done.returncode != 0:
        raise PipelineError(f"ffprobe cannot read {path.name}: {last_lines(done.stderr, 3)}")
    try:
        return int(done.stdout.strip().rstrip(","))
    except ValueError:
        raise PipelineError(f"ffprobe gave no packet count for {path.name}: {done.stdout.strip()!r}") from None


# -- the store of finished chunks -------------------------------------------------------------------------------

def store_path(out: Path) -> Path:
    """The chunk folder for OUT: hidden, beside it (same filesystem, so the join reads locally)."""
    return out.with_name(f".{out.name}.chunks")


class ChunkStore:
    """Finished chunks of one job, in ``store_path(OUT)``. One driver at a time uses it (the caller holds the
    partial file's lock for OUT); workers hand chunks to the driver, which calls ``add``."""

    def __init__(self, out: Path, job: ChunkJob):
        self.dir = store_path(out)
        self.job_key = job.key()
        self.summary = job.summary()
        self.entries: dict[str, dict] = {}  # chunk key -> {"file", "sha256", "frames"}
        self.notes: list[str] = []
        self.lock_fd: int | None = None

    def open(self) -> "ChunkStore":
        """Create the folder, or take over what a previous run of the same job left; a different job's chunks
        are deleted. Temp files of interrupted transfers are removed."""
        if self.dir.is_symlink() or (self.dir.exists() and not self.dir.is_dir()):
            raise UserError(f"--output: {self.dir} is in the way of the chunk folder (not a folder); remove it")
        self.dir.mkdir(exist_ok=True)
        self._lock()
        manifest = self._read_manifest()
        if manifest is not None and manifest.get("job") == self.job_key and manifest.get("format") == STORE_FORMAT:
            self.entries = {k: v for k, v in manifest.get("chunks", {}).items() if isinstance(v, dict)}
        elif manifest is not None or any(e.name != LOCK_NAME for e in self.dir.iterdir()):
            self.notes.append(f"{self.dir} held chunks of a different job (other source, model or options): "
                              "discarded")
            for entry in self.dir.iterdir():
                if entry.name == LOCK_NAME:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        for tmp in self.dir.glob("*.tmp"):
            tmp.unlink()
        self._write_manifest()
        return self

    def _lock(self) -> None:
        """One run per chunk folder: a second run for the same OUT would render the same chunks twice."""
        import fcntl

        self.lock_fd = os.open(self.dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.lock_fd)
            self.lock_fd = None
            raise UserError(f"--output: another selftransfer upscale is rendering chunks into {self.dir}") from None

    def close(self) -> None:
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None

    def _read_manifest(self) -> dict | None:
        path = self.dir / MANIFEST_NAME
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _write_manifest(self) -> None:
        data = {"format": STORE_FORMAT, "job": self.job_key, "job_summary": self.summary,
                "chunks": dict(sorted(self.entries.items(), key=lambda kv: int(kv[0].split("-")[0])))}
        atomic_write(self.dir / MANIFEST_NAME, (json.dumps(data, indent=1) + "\n").encode("utf-8"))

    def finished(self, plan: list[Chunk]) -> list[Chunk]:
        """The chunks of ``plan`` a previous run finished and whose files still hash to what was recorded (read
        in full: a chunk damaged on disk is rendered again rather than joined)."""
        good, dropped = [], False
        for chunk in plan:
            entry = self.entries.get(chunk.key)
            if entry is None:
                continue
            path = self.dir / chunk.name
            if entry.get("file") == chunk.name and path.is_file() and sha256_file(path) == entry.get("sha256"):
                good.append(chunk)
            else:
                del self.entries[chunk.key]
                dropped = True
                self.notes.append(f"{path.name} does not match its recorded sha256: rendering it again")
        if dropped:
            self._write_manifest()
        return good

    def temp_path(self, chunk: Chunk, token: str) -> Path:
        """Where a transfer of ``chunk`` (one attempt, ``token``) is written before it is verified."""
        return self.dir / f".{chunk.name}.{token}.tmp"

    def add(self, chunk: Chunk, written: Path, sha256: str) -> None:
        """Adopt the file ``written`` (complete, fsynced) as ``chunk`` if it hashes to ``sha256``."""
        actual = sha256_file(written)
        if actual != sha256:
            written.unlink()
            raise PipelineError(f"chunk {chunk.start}..{chunk.end - 1} arrived damaged (sha256 {actual[:12]}, "
                                f"sent {sha256[:12]})")
        os.replace(written, self.dir / chunk.name)
        fsync_dir(self.dir)
        self.entries[chunk.key] = {"file": chunk.name, "sha256": sha256, "frames": chunk.frames}
        self._write_manifest()

    def concat_list(self, plan: list[Chunk]) -> Path:
        """An ffconcat list of the plan's chunk files, absolute and quoted."""
        lines = ["ffconcat version 1.0"]
        for chunk in plan:
            path = str((self.dir / chunk.name).resolve()).replace("'", "'\\''")
            lines.append(f"file '{path}'")
        listing = self.dir / CONCAT_LIST_NAME
        listing.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return listing

    def remove(self) -> None:
        """After the join is committed as OUT: the chunks are no longer needed."""
        shutil.rmtree(self.dir, ignore_errors=True)
        self.close()


# -- the join ---------------------------------------------------------------------------------------------------

def concat_input(listing: Path) -> list[str]:
    """ffmpeg input options that read the chunks back to back as one video stream, packets untouched."""
    return ["-f", "concat", "-safe", "0", "-i", str(listing)]


def copy_video_args(encoder_args: list[str]) -> list[str]:
    """The join's video options: stream copy, keeping the encoder options that are container tags (hvc1)."""
    args = ["-c:v", "copy"]
    for i, arg in enumerate(encoder_args[:-1]):
        if arg.startswith("-tag:v"):
            args += [arg, encoder_args[i + 1]]
    return args


def run_ffmpeg(cmd: list[str], *, pass_fds: tuple[int, ...] = (), what: str = "ffmpeg") -> None:
    """One ffmpeg run that dies with us; PipelineError with its last lines if it fails."""
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            pass_fds=pass_fds, preexec_fn=die_with_parent(os.getpid()))
    try:
        _, err = proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        text = err.decode("utf-8", "replace")
        raise PipelineError(f"{what} failed ({exit_status(proc.returncode)}): {last_lines(text, 5)}")
