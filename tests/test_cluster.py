"""``selftransfer upscale --ray``: chunks rendered as Ray tasks on a local cluster give the one-process run's frames
exactly (decoded frame hashes and timestamps; constant and variable frame rate; chunk boundaries on keyframes and
inside GOPs), keep the source's audio, survive a worker SIGKILLed mid-chunk (Ray retries it) and a driver SIGKILLed
between chunks (the rerun reuses the finished chunks, checked by hash), and never leave a file named OUT unfinished.
Chunk planning and the chunk store are tested without Ray.

The clip: 48 frames of the shared Big Buck Bunny at 160x90 with its AAC audio, a keyframe every 12 frames; the model
is the tiny random bundle (plumbing, not quality)."""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from selftransfer_trainer.cli import main
from test_upscale import audio_packets, plugin  # noqa: F401  (plugin: the fixture that checks vspipe loads the plugin)
from vs_selftransfer.files import sha256_file
from vs_selftransfer.pipeline import chunks as chunking
from vs_selftransfer.pipeline import cluster
from vs_selftransfer.pipeline.options import FilterOptions

FRAMES, GOP = 48, 12
HAVE_FFMPEG = bool(shutil.which("ffmpeg") and shutil.which("ffprobe"))
needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="Ray is not installed (pip install 'selftransfer[cluster]')")


def ffmpeg(*args):
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", *map(str, args)], check=True)


def frame_hashes(path: Path) -> list[tuple[str, str]]:
    """(pts, md5) of every decoded video frame, as ffmpeg's framemd5 prints them."""
    done = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-map", "0:v:0", "-f", "framemd5",
                           "-"], check=True, capture_output=True, text=True)
    rows = [line.split(",") for line in done.stdout.splitlines() if line and not line.startswith("#")]
    return [(r[2].strip(), r[5].strip()) for r in rows]


def keyframe_indices(path: Path) -> list[int]:
    done = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries", "packet=pts,flags",
                           "-of", "csv=p=0", str(path)], check=True, capture_output=True, text=True)
    packets = sorted((int(pts), flags) for pts, flags in (line.split(",")[:2] for line in done.stdout.split()))
    return [i for i, (_, flags) in enumerate(packets) if "K" in flags]


def run(capsys, *args) -> tuple[int, str]:
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err


def beside(out: Path) -> list[str]:
    """Everything in OUT's folder that is not an input: no partial files, no chunk folder once done."""
    return sorted(p.name for p in out.parent.iterdir())


# -- media, the cluster, the one-process references -----------------------------------------------------------

@pytest.fixture(scope="module")
def media(tmp_path_factory, clip_path) -> SimpleNamespace:
    if not HAVE_FFMPEG:
        pytest.skip("ffmpeg and ffprobe are needed (apt install ffmpeg)")
    d = tmp_path_factory.mktemp("cluster_media")
    small = d / "small.mp4"
    ffmpeg("-i", clip_path, "-frames:v", FRAMES, "-t", FRAMES / 25, "-vf", "scale=160:90", "-c:v", "libx264",
           "-preset", "veryfast", "-crf", "18", "-g", GOP, "-keyint_min", GOP, "-sc_threshold", "0", "-c:a", "copy",
           small)
    vfr = d / "vfr.mkv"  # frames 0-19 last 40 ms, the others 80 ms
    ffmpeg("-i", small, "-vf", "setpts='if(lt(N,20),N*0.04,0.8+(N-20)*0.08)/TB'", "-fps_mode", "vfr", "-c:v",
           "libx264", "-preset", "veryfast", "-g", GOP, "-c:a", "copy", vfr)
    return SimpleNamespace(dir=d, small=small, vfr=vfr)


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """One local Ray cluster (2 CPUs) for the module; `--ray local` in the same process joins it. BestSource's index
    cache goes to a temp folder (the workers inherit the environment of the cluster's processes)."""
    if importlib.util.find_spec("ray") is None:
        pytest.skip("Ray is not installed (pip install 'selftransfer[cluster]')")
    import ray

    cache = tmp_path_factory.mktemp("xdg_cache")
    saved = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(cache)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    try:
        yield SimpleNamespace(address=ray.get_runtime_context().gcs_address, cache=cache)
    finally:
        ray.shutdown()
        if saved is None:
            os.environ.pop("XDG_CACHE_HOME", None)
        else:
            os.environ["XDG_CACHE_HOME"] = saved


def one_process(media_path: Path, bundle: Path, out: Path, *extra) -> Path:
    rc = main(["upscale", str(media_path), "-o", str(out), "--model", str(bundle), *map(str, extra)])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def reference(plugin, media, tiny_bundle, tmp_path_factory) -> SimpleNamespace:  # noqa: F811
    d = tmp_path_factory.mktemp("one_process")
    return SimpleNamespace(
        small=frame_hashes(one_process(media.small, tiny_bundle, d / "small.mkv", "--encoder", "ffv1")),
        vfr=frame_hashes(one_process(media.vfr, tiny_bundle, d / "vfr.mkv", "--encoder", "ffv1")))


def chunked(capsys, source: Path, bundle: Path, out: Path, *extra) -> str:
    rc, err = run(capsys, "upscale", source, "-o", out, "--model", bundle, "--ray", "local", *extra)
    assert rc == 0, err
    assert beside(out) == [out.name], "the chunk folder or a partial file was left behind"
    return err


# -- planning and the store (no Ray) ------------------------------------------------------------------------------

def test_chunks_end_at_keyframes_in_the_second_half_of_the_window_else_inside_the_gop():
    plan = chunking.plan_chunks(FRAMES, [0, 12, 24, 36], 7)
    assert [(c.start, c.end) for c in plan] == [(0, 7), (7, 12), (12, 19), (19, 24), (24, 31), (31, 36), (36, 43),
                                                (43, 48)]
    assert [(c.start, c.end) for c in chunking.plan_chunks(FRAMES, [0, 12, 24, 36], 16)] == [
        (0, 12), (12, 24), (24, 36), (36, 48)]
    # A keyframe just after the start does not make a tiny chunk; one beyond the window is not waited for.
    assert [(c.start, c.end) for c in chunking.plan_chunks(100, [0, 2, 60], 50)] == [(0, 50), (50, 100)]
    assert [(c.start, c.end) for c in chunking.plan_chunks(5, [0], 100)] == [(0, 5)]
    assert [c.frames for c in chunking.plan_chunks(10, [], 1)] == [1] * 10
    for frames, keys, limit in [(1, [0], 1), (1000, list(range(0, 1000, 250)), 333), (997, [0, 1, 500, 996], 64)]:
        plan = chunking.plan_chunks(frames, keys, limit)
        assert plan[0].start == 0 and plan[-1].end == frames
        assert all(a.end == b.start for a, b in zip(plan, plan[1:]))  # no frame dropped or repeated
        assert all(1 <= c.frames <= limit for c in plan)


def _job(**changes) -> chunking.ChunkJob:
    fields = dict(version="1.0.0", source_path="/videos/a.mkv", source_size=10, source_sha256="a" * 64,
                  bundle_path="/models/a.stm", bundle_size=5, bundle_sha256="b" * 64, options=FilterOptions(),
                  video_args=("-c:v", "ffv1"), frames=FRAMES)
    fields.update(changes)
    return chunking.ChunkJob(**fields)


def test_store_reuses_intact_chunks_of_the_same_job_only(tmp_path):
    out = tmp_path / "out.mkv"
    chunk = chunking.Chunk(0, 12)
    store = chunking.ChunkStore(out, _job()).open()
    with pytest.raises(Exception, match="another selftransfer upscale"):
        chunking.ChunkStore(out, _job()).open()  # one run per chunk folder
    data = b"not really a video, but bytes with a hash"
    written = store.temp_path(chunk, "0" * 32)
    written.write_bytes(data)
    with pytest.raises(Exception, match="damaged"):
        store.add(chunk, written, "0" * 64)
    assert not written.exists() and not (store.dir / chunk.name).exists()
    written.write_bytes(data)
    store.add(chunk, written, sha256_file(written))
    store.close()

    # The same job, with paths moved (not part of its identity), reuses the chunk.
    again = chunking.ChunkStore(out, _job(source_path="/elsewhere/a.mkv")).open()
    assert again.finished([chunk, chunking.Chunk(12, 24)]) == [chunk]
    again.close()
    # A damaged chunk file is not joined: it is rendered again.
    (store.dir / chunk.name).write_bytes(data[:-1] + b"?")
    damaged = chunking.ChunkStore(out, _job()).open()
    assert damaged.finished([chunk]) == [] and "does not match" in damaged.notes[0]
    damaged.close()
    # Any other job (model, source, filter or encoder options, frame count) starts from an empty folder.
    written = store.temp_path(chunk, "1" * 32)
    for other in [_job(bundle_sha256="c" * 64), _job(source_sha256="d" * 64), _job(video_args=("-c:v", "libx264")),
                  _job(options=FilterOptions(tilesize=(64,))), _job(frames=FRAMES + 1)]:
        keep = chunking.ChunkStore(out, _job()).open()
        written.write_bytes(data)
        keep.add(chunk, written, sha256_file(written))
        keep.close()
        fresh = chunking.ChunkStore(out, other).open()
        assert fresh.finished([chunk]) == [] and "different job" in fresh.notes[0]
        assert sorted(p.name for p in fresh.dir.iterdir()) == [chunking.LOCK_NAME, chunking.MANIFEST_NAME]
        fresh.close()


def test_cluster_arguments_are_checked_up_front(media, tiny_bundle, tmp_path, capsys, monkeypatch):
    base = ["upscale", media.small, "-o", tmp_path / "out.mkv", "--model", tiny_bundle]
    for extra, message in [(["--workers", "2"], "--workers applies to chunked rendering only"),
                           (["--chunk-frames", "9"], "--chunk-frames applies to chunked rendering only"),
                           (["--ray", "local", "--workers", "0"], "--workers must be at least 1"),
                           (["--ray", "local", "--chunk-frames", "0"], "--chunk-frames must be at least 1"),
                           (["--ray", "ray://head:10001"], "Ray Client addresses are not supported")]:
        rc, err = run(capsys, *base, *extra)
        assert rc != 0 and message in err, err
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    rc, err = run(capsys, *base, "--ray", "local")
    assert rc == 2 and "pip install 'selftransfer[cluster]'" in err, err
    assert list(tmp_path.iterdir()) == []


# -- on the cluster -------------------------------------------------------------------------------------------------

@needs_ray
def test_chunked_output_is_the_one_process_output(ray_cluster, reference, media, tiny_bundle, tmp_path, capsys):
    """Boundaries on keyframes (12, 24, 36) and inside GOPs (7, 19, 31, 43): every frame and timestamp equal, the
    audio packets copied unchanged, one progress bar for the whole video."""
    out = tmp_path / "out.mkv"
    err = chunked(capsys, media.small, tiny_bundle, out, "--encoder", "ffv1", "--workers", "2", "--chunk-frames", 7)
    assert frame_hashes(out) == reference.small
    assert audio_packets(out) == audio_packets(media.small)
    bars = [line for line in err.splitlines() if "frames " in line and " fps, ETA " in line]
    assert bars and all(f"/{FRAMES} " in line for line in bars) and f"frames {FRAMES}/{FRAMES}" in bars[-1], err
    assert "rendered 8 of 8 chunks" in err


@needs_ray
def test_variable_frame_rate_source_matches_the_one_process_run(ray_cluster, reference, media, tiny_bundle,
                                                                tmp_path, capsys):
    out = tmp_path / "out.mkv"
    err = chunked(capsys, media.vfr, tiny_bundle, out, "--encoder", "ffv1", "--chunk-frames", 20)
    assert "variable frame rate" in err  # the same warning: both runs come out constant-rate
    assert frame_hashes(out) == reference.vfr


@needs_ray
def test_x264_chunks_start_with_a_keyframe_and_keep_the_timeline(ray_cluster, plugin, media, tiny_bundle,  # noqa
                                                                 tmp_path, tmp_path_factory, capsys):
    """A lossy encoder cannot give the one-process bytes (each chunk is its own encode): each chunk starts with an
    IDR picture, and the joined MP4 has every frame at the one-process run's timestamp."""
    whole = one_process(media.small, tiny_bundle, tmp_path_factory.mktemp("whole") / "out.mp4", "--preset",
                        "veryfast")
    out = tmp_path / "out.mp4"
    chunked(capsys, media.small, tiny_bundle, out, "--preset", "veryfast", "--chunk-frames", 16)
    assert keyframe_indices(out) == [0, 12, 24, 36]
    assert [pts for pts, _ in frame_hashes(out)] == [pts for pts, _ in frame_hashes(whole)] == [
        str(i) for i in range(FRAMES)]
    assert audio_packets(out) == audio_packets(media.small)


@needs_ray
def test_a_worker_killed_mid_chunk_is_retried_and_the_output_is_exact(ray_cluster, reference, media, tiny_bundle,
                                                                      tmp_path, tmp_path_factory, capsys,
                                                                      monkeypatch):
    marker = tmp_path_factory.mktemp("hook") / "killed"
    monkeypatch.setenv(cluster.KILL_HOOK_ENV, f"12:{marker}")
    out = tmp_path / "out.mkv"
    chunked(capsys, media.small, tiny_bundle, out, "--encoder", "ffv1", "--chunk-frames", GOP)
    assert marker.exists(), "the worker rendering frames 12..23 was not killed"
    assert frame_hashes(out) == reference.small


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        except OSError:
            continue
        out += map(int, children)
        todo += map(int, children)
    return out


@needs_ray
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_killed_driver_is_resumed_from_its_finished_chunks(ray_cluster, reference, media, tiny_bundle, tmp_path,
                                                             capsys):
    """A driver process on the module's cluster (--ray ADDRESS) is SIGKILLed once two of its eight chunks are in
    the store; nothing named OUT exists; the same command then renders only the rest and gives the exact output."""
    out = tmp_path / "out.mkv"
    args = ["upscale", str(media.small), "-o", str(out), "--model", str(tiny_bundle), "--encoder", "ffv1",
            "--chunk-frames", "6", "--workers", "1"]
    env = {**os.environ, "RAY_AUTH_MODE": "token"}  # an explicit address: the driver uses the cluster's token
    driver = subprocess.Popen([sys.executable, "-m", "selftransfer_trainer.cli", *args, "--ray",
                               ray_cluster.address], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    manifest = chunking.store_path(out) / chunking.MANIFEST_NAME
    deadline = time.monotonic() + 120
    while True:
        assert driver.poll() is None, driver.stderr.read().decode()
        assert time.monotonic() < deadline, "the driver finished no chunk in time"
        try:
            if len(json.loads(manifest.read_text())["chunks"]) >= 2:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    children = _descendants(driver.pid)
    driver.kill()
    driver.wait()
    for pid in children:  # its vspipe/ffmpeg die with it (PR_SET_PDEATHSIG); anything else it started goes now
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not out.exists()
    assert beside(out) == [chunking.store_path(out).name]  # only the chunks: no partial output under any name
    finished = len(json.loads(manifest.read_text())["chunks"])

    rc, err = run(capsys, *args, "--ray", "local")
    assert rc == 0, err
    assert f"reusing {finished} of 8 chunks" in err and f"rendered {8 - finished} of 8 chunks" in err, err
    assert frame_hashes(out) == reference.small
    assert beside(out) == [out.name]


@needs_ray
def test_files_reach_a_machine_once_and_are_checked_by_sha256(ray_cluster, tmp_path):
    """The path a worker uses when it does not see the driver's files: a content-addressed copy through the hub."""
    import ray

    payload = tmp_path / "payload.bin"
    payload.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    digest, size = sha256_file(payload), payload.stat().st_size
    hub = ray.remote(num_cpus=0)(cluster.Hub).remote({"source": str(payload)}, str(tmp_path))

    @ray.remote(num_cpus=0)
    def fetch(expected: str) -> str:
        cache = cluster.NodeCache()
        cache.copy_path(expected, ".bin").unlink(missing_ok=True)
        try:
            path = cache.fetch(hub, "source", expected, size, ".bin")
        except cluster.PipelineError as e:
            return f"refused: {e}"
        digest = sha256_file(path)
        path.unlink()
        return digest

    assert ray.get(fetch.remote(digest)) == digest
    assert ray.get(fetch.remote("0" * 64)).startswith("refused: the source sent by the driver does not match")
    ray.kill(hub)
