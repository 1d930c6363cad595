"""``selftransfer upscale --ray ADDRESS``: the chunks of ``chunks`` rendered as Ray tasks across machines.

Ray does the distributed part (placement, retries of tasks whose worker or machine died, the object store); this
module only says what a chunk task is and moves files:

- **One hub actor on the driver's machine** serves the bundle and the source to workers that lack them, takes the
  finished chunks back in pieces (written straight into the chunk folder beside OUT, so neither side ever holds a
  whole chunk in memory), and collects each running chunk's frame count for the one progress bar.
- **Each machine keeps content-addressed copies** (``$TMPDIR/selftransfer-cluster-UID/files/SHA256.ext``), fetched
  once per machine under a file lock and checked against the driver's sha256 before use. A worker that sees the
  driver's source path itself (shared storage, or the driver's own machine) with the same size reads it there,
  after checking its sha256 once per machine. Copies of the source are deleted when the job ends.
- **A chunk task** renders and encodes its frames with ``chunks.render_chunk`` and sends the file back with its
  sha256; the driver adopts it into the store only when the bytes it received hash the same. A task whose worker
  process or machine dies is retried by Ray (``max_retries``); an error of the chunk itself (a failing frame, a
  missing plugin) is not retried: it stops the job, and the finished chunks stay for the rerun.

Test hook: ``SELFTRANSFER_TEST_KILL_CHUNK=START:MARKER`` in the driver's environment makes the worker rendering
the chunk that starts at frame START SIGKILL itself after its first frame, once: it creates the file MARKER first
and spares any attempt that finds it. The fault-tolerance tests use it to kill a worker mid-chunk.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from vs_selftransfer.errors import UserError
from vs_selftransfer.files import atomic_write, sha256_file
from vs_selftransfer.pipeline import chunks as chunking
from vs_selftransfer.pipeline.chunks import Chunk, ChunkJob, ChunkStore
from vs_selftransfer.pipeline.process import PipelineError

CLUSTER_EXTRA = "pip install 'selftransfer[cluster]'"
KILL_HOOK_ENV = "SELFTRANSFER_TEST_KILL_CHUNK"
PIECE_BYTES = 32 << 20  # per actor call, each way: bounded memory for any file size
CHUNK_RETRIES = 3  # Ray re-runs a chunk whose worker died this many times
PROGRESS_INTERVAL = 0.5  # seconds between a worker's progress reports and the driver's redraws
_TEMP_NAME = re.compile(r"\.chunk-\d{8}-\d{8}\.mkv\.[0-9a-f]{32}\.tmp")


# -- arguments --------------------------------------------------------------------------------------------------

def add_arguments(p) -> None:
    g = p.add_argument_group("several machines (Ray; pip install 'selftransfer[cluster]')")
    g.add_argument("--ray", metavar="ADDRESS",
                   help="render chunks as Ray tasks: 'local' starts a Ray cluster on this machine, HOST:6379 "
                        "joins the cluster of `ray start --head` (run this on a machine of that cluster), 'auto' "
                        "the one this machine belongs to")
    g.add_argument("--workers", type=int, metavar="N", help="chunks rendered at once (default: one per Ray CPU, "
                                                            "or per GPU with --device cuda)")
    g.add_argument("--chunk-frames", type=int, metavar="N",
                   help=f"longest chunk in frames (default {chunking.DEFAULT_CHUNK_FRAMES}); chunks end at source "
                        "keyframes where possible")


def check_arguments(args) -> None:
    """Before any work: the cluster options make sense together and Ray is installed when --ray is given."""
    if args.ray is None:
        for flag, value in (("--workers", args.workers), ("--chunk-frames", args.chunk_frames)):
            if value is not None:
                raise UserError(f"{flag} applies to chunked rendering only: add --ray local (this machine) or "
                                f"--ray HOST:6379 (a cluster)")
        return
    if not args.ray.strip():
        raise UserError("--ray needs an address: local, auto or HOST:PORT of the head node")
    if args.ray.startswith("ray://"):
        raise UserError(f"--ray {args.ray}: Ray Client addresses are not supported (the output is written by the "
                        f"driver's machine); run selftransfer on a machine of the cluster (`ray start --address "
                        f"HEAD:6379`) and pass --ray HEAD:6379")
    if re.fullmatch(r"\s*cuda\s*:\s*[1-9]\d*\s*", args.device or ""):
        raise UserError(f"--device {args.device}: with --ray each chunk gets one GPU of its machine from Ray "
                        f"(it is cuda:0 inside the task); use --device cuda")
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers must be at least 1, not {args.workers}")
    if args.chunk_frames is not None and args.chunk_frames < 1:
        raise UserError(f"--chunk-frames must be at least 1, not {args.chunk_frames}")
    import_ray()


def import_ray():
    try:
        import ray
    except ImportError:
        raise UserError(f"--ray needs Ray, an optional extra of selftransfer: {CLUSTER_EXTRA}") from None
    return ray


def kill_hook() -> tuple[int, str] | None:
    value = os.environ.get(KILL_HOOK_ENV)
    if not value:
        return None
    start, _, marker = value.partition(":")
    return int(start), marker


# -- the hub actor (driver's machine) ---------------------------------------------------------------------------

class Hub:
    """Files out (bundle, source), chunks in, progress: the driver's end of every transfer."""

    def __init__(self, files: dict[str, str], store_dir: str):
        self.files = files
        self.store_dir = Path(store_dir)
        self.open_files: dict[str, int] = {}
        self.done: dict[str, int] = {}
        self.lock = threading.Lock()

    def read(self, name: str, offset: int, size: int) -> bytes:
        with open(self.files[name], "rb") as f:
            f.seek(offset)
            return f.read(size)

    def write(self, temp_name: str, offset: int, data: bytes) -> None:
        if not _TEMP_NAME.fullmatch(temp_name):
            raise ValueError(f"not a chunk transfer name: {temp_name!r}")
        with self.lock:
            fd = self.open_files.get(temp_name)
            if fd is None:
                fd = self.open_files[temp_name] = os.open(self.store_dir / temp_name,
                                                          os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                                                          0o644)
        os.pwrite(fd, data, offset)

    def finish(self, temp_name: str) -> None:
        with self.lock:
            fd = self.open_files.pop(temp_name)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def report(self, chunk_key: str, done: int) -> None:
        self.done[chunk_key] = done

    def progress(self) -> dict[str, int]:
        return dict(self.done)

    def close(self) -> None:
        with self.lock:
            for fd in self.open_files.values():
                os.close(fd)
            self.open_files.clear()


# -- each machine's cache ---------------------------------------------------------------------------------------

class NodeCache:
    """Per machine and user: content-addressed copies of bundles and sources, and which local files were found
    to hash as expected. Shared by all tasks on the machine; file locks keep them from fetching twice."""

    def __init__(self):
        self.root = Path(tempfile.gettempdir()) / f"selftransfer-cluster-{os.getuid()}"
        for sub in ("files", "locks", "verified"):
            (self.root / sub).mkdir(parents=True, exist_ok=True, mode=0o700)

    @contextlib.contextmanager
    def lock(self, name: str):
        import fcntl

        fd = os.open(self.root / "locks" / name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def copy_path(self, sha256: str, suffix: str) -> Path:
        return self.root / "files" / f"{sha256}{suffix}"

    def fetch(self, hub, name: str, sha256: str, size: int, suffix: str) -> Path:
        """The machine's copy of the driver's file ``name``, fetched through the hub if missing."""
        import ray

        target = self.copy_path(sha256, suffix)
        with self.lock(sha256):
            if target.is_file() and target.stat().st_size == size:  # verified before it got this name
                return target
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            digest, written = hashlib.sha256(), 0
            with open(tmp, "wb") as f:
                while written < size:
                    data = ray.get(hub.read.remote(name, written, PIECE_BYTES))
                    if not data:
                        break
                    f.write(data)
                    digest.update(data)
                    written += len(data)
                f.flush()
                os.fsync(f.fileno())
            if written != size or digest.hexdigest() != sha256:
                tmp.unlink()
                raise PipelineError(f"the {name} sent by the driver does not match its sha256 (changed on the "
                                    f"driver's disk during the job?)")
            os.replace(tmp, target)
            return target

    def _marker(self, path: Path, st: os.stat_result) -> Path:
        key = hashlib.sha256(f"{path}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()
        return self.root / "verified" / key

    def mark_verified(self, path: Path, sha256: str) -> None:
        """Record that ``path`` (as it is now) hashes to ``sha256`` (the driver did the hashing)."""
        atomic_write(self._marker(path, path.stat()), sha256.encode())

    def local(self, path: str, size: int, sha256: str) -> Path | None:
        """``path`` itself if this machine has it with the driver's content, checked by sha256 once per machine
        (and again whenever the file's size or modification time changes)."""
        p = Path(path)
        try:
            st = p.stat()
        except OSError:
            return None
        if st.st_size != size:
            return None
        marker = self._marker(p, st)
        with self.lock(marker.name):
            try:
                if marker.read_text() == sha256:
                    return p
            except OSError:
                pass
            if sha256_file(p) != sha256:
                return None
            atomic_write(marker, sha256.encode())
            return p


def forget_copy(sha256: str, suffix: str) -> None:
    """Task run on each machine that copied the source, at the end of the job."""
    cache = NodeCache()
    with cache.lock(sha256):
        cache.copy_path(sha256, suffix).unlink(missing_ok=True)


# -- the chunk task (any machine) -------------------------------------------------------------------------------

class _ChunkProgress:
    """What run_pipeline feeds with vspipe's progress: forwards the chunk's frame count to the hub."""

    def __init__(self, hub, chunk: Chunk, hook: tuple[int, str] | None):
        self.hub, self.chunk, self.hook = hub, chunk, hook
        self.total = chunk.frames
        self.done = 0
        self.first_frame_at: float | None = None
        self._last_report = 0.0

    def indexing(self, percent: int) -> None:
        pass

    def frames(self, done: int, total: int) -> None:
        now = time.monotonic()
        if self.first_frame_at is None:
            self.first_frame_at = now
        self.done = done
        if now - self._last_report >= PROGRESS_INTERVAL or done == total:
            self._last_report = now
            self.hub.report.remote(self.chunk.key, done)
        if self.hook is not None and self.hook[0] == self.chunk.start and done >= 1:
            try:
                os.close(os.open(self.hook[1], os.O_WRONLY | os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                return  # a retry: let it finish
            os.kill(os.getpid(), signal.SIGKILL)


def render_chunk_task(job: ChunkJob, chunk: Chunk, hub, hook: tuple[int, str] | None) -> dict:
    """Render, encode and send back one chunk; returns what the driver needs to adopt it, and timings. Errors
    name the machine."""
    import socket

    try:
        return _render_chunk(job, chunk, hub, hook)
    except (PipelineError, UserError, OSError) as e:
        raise PipelineError(f"on {socket.gethostname()}: {e}") from None


def _render_chunk(job: ChunkJob, chunk: Chunk, hub, hook: tuple[int, str] | None) -> dict:
    import ray

    from vs_selftransfer import __version__
    from vs_selftransfer.pipeline.media import find_tools

    started, started_at = time.monotonic(), time.time()
    node = ray.get_runtime_context().get_node_id()
    if __version__ != job.version:
        raise UserError(f"this machine runs selftransfer {__version__}, the driver {job.version}: install the "
                        f"same version on every machine")
    cache = NodeCache()
    bundle = cache.fetch(hub, "bundle", job.bundle_sha256, job.bundle_size, ".stm")
    source = cache.local(job.source_path, job.source_size, job.source_sha256)
    source_copied = source is None
    if source is None:
        source = cache.fetch(hub, "source", job.source_sha256, job.source_size, Path(job.source_path).suffix)
    fetched = time.monotonic()

    work = Path(tempfile.mkdtemp(prefix="selftransfer-chunk-"))
    try:
        text = chunking.chunk_script(job, source, bundle)
        script = work / "chunk.vpy"
        script.write_text(text, encoding="utf-8")
        # The first chunk on a machine opens the script once alone: BestSource indexes the source then (one
        # machine-wide index), and the clip's length is checked against the driver's frame count.
        script_key = "script-" + hashlib.sha256(text.encode()).hexdigest()
        checked = cache.root / "verified" / script_key
        with cache.lock(script_key):
            if not checked.is_file():
                frames = chunking.script_frames(find_tools().vspipe, script)
                if frames != job.frames:
                    raise PipelineError(f"the script has {frames} frames here, the driver counted {job.frames} "
                                        f"(a different BestSource or FFmpeg on this machine?)")
                atomic_write(checked, str(frames).encode())
        prepared = time.monotonic()

        output = work / chunk.name
        progress = _ChunkProgress(hub, chunk, hook)
        chunking.render_chunk(job, chunk, script, output, progress)
        rendered = time.monotonic()

        sha256 = sha256_file(output)
        token = uuid.uuid4().hex
        temp_name = f".{chunk.name}.{token}.tmp"
        size = output.stat().st_size
        with open(output, "rb") as f:
            offset = 0
            while data := f.read(PIECE_BYTES):
                ray.get(hub.write.remote(temp_name, offset, data))
                offset += len(data)
        ray.get(hub.finish.remote(temp_name))
        sent = time.monotonic()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    first_frame = progress.first_frame_at or rendered
    return {"token": token, "sha256": sha256, "size": size, "node": node, "source_copied": source_copied,
            "started_at": started_at, "seconds": {"fetch": fetched - started, "prepare": prepared - fetched,
                        "first_frame": first_frame - prepared, "render": rendered - prepared,
                        "send": sent - rendered, "total": sent - started}}


# -- the driver -------------------------------------------------------------------------------------------------

def connect(address: str) -> bool:
    """Join (or for 'local' start) the Ray cluster; True when this call started the connection (and so must end
    it). An already connected process (a library caller, the tests) keeps its connection."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    import logging

    # ray.init takes SIGTERM over; the caller's handler (remove the partial file, exit 128+15) must stay.
    previous = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    # Ray's informational and warning lines would interleave with the progress bar; its failures raise.
    kwargs = {"log_to_driver": False, "logging_level": logging.ERROR}
    try:
        if address == "local":
            ray.init(include_dashboard=False, **kwargs)
        else:
            ray.init(address=address, **kwargs)
    except Exception as e:  # ConnectionError, or ValueError for a malformed address
        auth = ("" if address == "local" or os.environ.get("RAY_AUTH_MODE") else
                "; a cluster with token authentication (Ray's default) also needs RAY_AUTH_MODE=token here and "
                "its token (`ray get-auth-token` on the head) in ~/.ray/auth_token")
        raise UserError(f"--ray {address}: cannot join a Ray cluster there ({type(e).__name__}: {e}); start one "
                        f"with `ray start --head`, or use --ray local{auth}") from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return True


def _chunk_resources(job: ChunkJob) -> dict:
    device = (job.options.device or "cpu").lower()
    return {"num_cpus": 1, "num_gpus": 1} if device.startswith("cuda") else {"num_cpus": 1}


def _capacity(ray, resources: dict, workers: int | None) -> int:
    if workers is not None:
        return workers
    available = ray.cluster_resources()
    kind = "GPU" if resources.get("num_gpus") else "CPU"
    return max(1, int(available.get(kind, 1)))


def _failure(ray, chunk: Chunk, error: Exception) -> PipelineError:
    what = f"chunk {chunk.start}..{chunk.end - 1}"
    if isinstance(error, ray.exceptions.RayTaskError):
        cause = error.cause if isinstance(error.cause, Exception) else error
        return PipelineError(f"{what}: {cause}")
    if isinstance(error, ray.exceptions.WorkerCrashedError):
        return PipelineError(f"{what}: its worker died {CHUNK_RETRIES + 1} times ({error})")
    return PipelineError(f"{what}: {type(error).__name__}: {error}")


def render_chunks(*, address: str, workers: int | None, job: ChunkJob, plan: list[Chunk], store: ChunkStore,
                  progress, verbose: bool = False, log=None) -> list[dict]:
    """Render every chunk of ``plan`` that ``store`` lacks on the Ray cluster at ``address`` and add them to it.
    Feeds ``progress`` (the pipeline's Progress) with the whole video's frame count. Returns each new chunk's
    result (timings, machine). Raises PipelineError for a chunk that failed; finished chunks stay in the store."""
    log = log or (lambda text: print(f"selftransfer upscale: {text}", file=sys.stderr, flush=True))
    ray = import_ray()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    reused = store.finished(plan)
    for note in store.notes:
        log(f"warning: {note}")
    if reused:
        log(f"reusing {len(reused)} of {len(plan)} chunks from {store.dir}")
    todo = [c for c in plan if c not in set(reused)]
    frames_done = sum(c.frames for c in reused)
    if not todo:
        progress.frames(frames_done, job.frames)
        return []

    started_here = connect(address)
    hub = None
    pending: dict = {}
    results: list[dict] = []
    copied_on: set[str] = set()
    try:
        here = ray.get_runtime_context().get_node_id()
        pin_here = NodeAffinitySchedulingStrategy(node_id=here, soft=False)
        hub = ray.remote(num_cpus=0, max_concurrency=8)(Hub).options(scheduling_strategy=pin_here).remote(
            {"bundle": job.bundle_path, "source": job.source_path}, str(store.dir))
        NodeCache().mark_verified(Path(job.source_path), job.source_sha256)
        resources = _chunk_resources(job)
        task = ray.remote(render_chunk_task).options(max_retries=CHUNK_RETRIES, retry_exceptions=False,
                                                     **resources)
        capacity = _capacity(ray, resources, workers)
        hook = kill_hook()
        shown = frames_done
        submitted: dict[Chunk, float] = {}
        if verbose:
            log(f"{len(todo)} chunks to render ({', '.join(f'{c.start}..{c.end - 1}' for c in todo)}), "
                f"{capacity} at a time")
        while todo or pending:
            while todo and len(pending) < capacity:
                chunk = todo.pop(0)
                pending[task.remote(job, chunk, hub, hook)] = chunk
                submitted[chunk] = time.time()
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=PROGRESS_INTERVAL)
            for ref in ready:
                chunk = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as e:  # the task's own error, or its worker died more than CHUNK_RETRIES times
                    raise _failure(ray, chunk, e) from None
                store.add(chunk, store.temp_path(chunk, result["token"]), result["sha256"])
                frames_done += chunk.frames
                result["chunk"] = chunk
                result["seconds"]["dispatch"] = result["started_at"] - submitted[chunk]  # one clock when local
                results.append(result)
                if result["source_copied"]:
                    copied_on.add(result["node"])
                if verbose:
                    s = result["seconds"]
                    log(f"chunk {chunk.start}..{chunk.end - 1} done on {result['node'][:12]}: "
                        f"{s['total']:.1f} s (fetch {s['fetch']:.1f}, render {s['render']:.1f}, send "
                        f"{s['send']:.1f})")
            running = ray.get(hub.progress.remote())
            now_done = frames_done + sum(running.get(c.key, 0) for c in pending.values())
            if now_done > shown:  # the bar's rate starts at the first rendered frame, not at cluster startup
                progress.frames(now_done, job.frames)
                shown = now_done
        return results
    except SystemError as e:
        # A signal handler's exception (SIGTERM's Terminated, Ctrl-C) raised while Ray's compiled code waits comes
        # out wrapped in SystemError: unwrap it, so termination is reported as such.
        if isinstance(e.__cause__, BaseException) and not isinstance(e.__cause__, Exception):
            raise e.__cause__ from None
        raise
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
        if hub is not None:
            with contextlib.suppress(Exception):
                ray.get(hub.close.remote(), timeout=10)
            ray.kill(hub)
        suffix = Path(job.source_path).suffix
        forget = ray.remote(num_cpus=0)(forget_copy)
        cleanups = [forget.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=n, soft=False))
                    .remote(job.source_sha256, suffix) for n in copied_on]
        if cleanups:
            with contextlib.suppress(Exception):
                ray.wait(cleanups, num_returns=len(cleanups), timeout=30)
        for tmp in store.dir.glob("*.tmp"):
            tmp.unlink(missing_ok=True)
        if started_here:
            ray.shutdown()


def upscale_in_chunks(args, *, source: Path, model: Path, options, encode, muxer: str, tools, info, streams,
                      stream_plan, output: str, pass_fds: tuple[int, ...], out: Path, out_size: tuple[int, int],
                      scratch: Path, progress) -> ChunkStore:
    """``selftransfer upscale --ray``: render the chunks on the cluster, then join them with the source's other
    streams into ``output`` (the partial file; the caller commits it to OUT and then removes the returned store).
    Everything but the video encode is the one-process run's: same script, same muxing command."""
    from vs_selftransfer import __version__
    from vs_selftransfer.pipeline.media import build_ffmpeg_command, color_args, encoder_args
    from vs_selftransfer.probe import frame_table

    chunk_args = (encoder_args(encode.encoder, encode.crf, encode.preset, chunking.CHUNK_CONTAINER)
                  + color_args(streams.video, *out_size) + encode.extra)
    join_video_args = chunking.copy_video_args(encoder_args(encode.encoder, encode.crf, encode.preset, muxer))

    def join_command(listing: Path, target: str, extra: list[str]) -> list[str]:
        return build_ffmpeg_command(tools.ffmpeg, source, target, muxer=muxer, video_args=join_video_args,
                                    streams=streams, plan=stream_plan, extra=extra,
                                    video_input=tuple(chunking.concat_input(listing)))

    if encode.extra:
        _trial_extra_args(tools.ffmpeg, chunk_args, join_command, encode.extra, out_size, scratch)
    job = ChunkJob(version=__version__, source_path=str(source), source_size=source.stat().st_size,
                   source_sha256=info.sha256, bundle_path=str(model), bundle_size=model.stat().st_size,
                   bundle_sha256=sha256_file(model), options=options, video_args=tuple(chunk_args),
                   frames=info.frames)
    plan = chunking.plan_chunks(info.frames, frame_table(source).keyframes,
                                args.chunk_frames or chunking.DEFAULT_CHUNK_FRAMES)
    store = ChunkStore(out, job).open()
    try:
        results = render_chunks(address=args.ray, workers=args.workers, job=job, plan=plan, store=store,
                                progress=progress, verbose=args.verbose)
        if results:
            machines = len({r["node"] for r in results})
            print(f"selftransfer upscale: rendered {len(results)} of {len(plan)} chunks on {machines} machine"
                  f"{'s' if machines != 1 else ''}", file=sys.stderr)
        cmd = join_command(store.concat_list(plan), output, encode.extra)
        if args.verbose:
            import shlex

            print(f"selftransfer upscale: join: {shlex.join(cmd)}", file=sys.stderr)
        chunking.run_ffmpeg(cmd, pass_fds=pass_fds, what="joining the chunks (ffmpeg)")
    except BaseException:
        if store.entries:
            store.close()
            print(f"selftransfer upscale: {len(store.entries)} finished chunks are kept in {store.dir}: run the "
                  f"same command again to resume", file=sys.stderr)
        else:
            store.remove()
        raise
    return store


def _trial_extra_args(ffmpeg: str, chunk_args: list[str], join_command, extra: list[str],
                      out_size: tuple[int, int], scratch: Path) -> None:
    """--ffmpeg-args go to both ffmpeg steps of a chunked run (the chunk encodes, and the join, which copies the
    video): try them on a two-frame blank chunk now rather than after hours of rendering."""
    trial = scratch / "trial-chunk.mkv"
    encode = [ffmpeg, "-hide_banner", "-nostdin", "-nostats", "-loglevel", "error", "-f", "lavfi", "-i",
              f"color=c=black:s={out_size[0]}x{out_size[1]}:r=25", "-frames:v", "2", "-map", "0:v:0", *chunk_args,
              "-f", chunking.CHUNK_CONTAINER, "-y", str(trial)]
    listing = scratch / "trial-concat.txt"
    listing.write_text(f"ffconcat version 1.0\nfile '{str(trial)}'\n", encoding="utf-8")
    try:
        chunking.run_ffmpeg(encode, what="the chunk encode")
        chunking.run_ffmpeg(join_command(listing, str(scratch / "trial-join"), [*extra, "-t", "0.04"]),
                            what="the join")
    except PipelineError as e:
        raise UserError(f"--ffmpeg-args: with --ray these options go to the chunk encodes and to the join, which "
                        f"copies the video without re-encoding; {e}") from None
