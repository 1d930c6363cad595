"""End to end through vspipe, the way encoders run the filter: `vspipe -c y4m script.vpy -` on a YUV clip gives every
frame at twice the size, identical to the same graph evaluated in this process; a frame that fails, or a script
that fails to evaluate, makes vspipe exit non-zero with the filter's message."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import vapoursynth as vs

from conftest import ROOT
from test_plugin import ensure_plugin

VSPIPE = Path(sys.executable).with_name("vspipe")
FRAMES, W, H = 6, 64, 48

SCRIPT = '''
import numpy as np
import vapoursynth as vs

core = vs.core
if not hasattr(core, "selftransfer"):
    core.std.LoadPlugin(plugin)

blank = core.std.BlankClip(format=vs.RGBS, width={w}, height={h}, length={frames})


def noise(n, f):
    out = f.copy()
    rng = np.random.default_rng(n)
    for p in range(3):
        np.asarray(out[p])[:] = rng.random(np.asarray(out[p]).shape, dtype=np.float32)
    return out


clip = core.resize.Bicubic(core.std.ModifyFrame(blank, blank, noise), format=vs.YUV420P8, matrix_s="709")
if source == "gray":
    clip = core.std.ShufflePlanes(clip, 0, vs.GRAY)

fail_at = int(fail_at)
if fail_at >= 0:
    # a backend that breaks on one frame: the error must reach vspipe
    import itertools
    import vs_selftransfer.runtime as runtime

    real, calls = runtime.tiled_upscale, itertools.count()

    def failing(*args, **kwargs):
        if next(calls) == fail_at:
            raise RuntimeError("injected backend failure")
        return real(*args, **kwargs)

    runtime.tiled_upscale = failing

core.selftransfer.Upscale(clip, model=model, backend="ort").set_output()
'''.format(w=W, h=H, frames=FRAMES)


@pytest.fixture(scope="module")
def script(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("vspipe") / "upscale.vpy"
    path.write_text(SCRIPT)
    return path


@pytest.fixture(scope="module")
def plugin_path() -> str:
    return ensure_plugin(vs.core)


def run_vspipe(script: Path, plugin: str, model: Path, *, fail_at: int = -1, source: str = "yuv"):
    if not VSPIPE.exists():
        pytest.skip(f"vspipe not found next to {sys.executable}")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    args = [str(VSPIPE), "-c", "y4m", "-a", f"plugin={plugin}", "-a", f"model={model}", "-a", f"fail_at={fail_at}",
            "-a", f"source={source}", str(script), "-"]
    return subprocess.run(args, capture_output=True, timeout=300, env=env)


def parse_y4m(data: bytes) -> tuple[dict, list[np.ndarray]]:
    """Header fields and the frames (Y, U, V planes of 4:2:0 8-bit) of a YUV4MPEG2 stream."""
    header, _, body = data.partition(b"\n")
    fields = header.split(b" ")
    assert fields[0] == b"YUV4MPEG2", header
    info = {f[:1].decode(): f[1:].decode() for f in fields[1:]}
    w, h = int(info["W"]), int(info["H"])
    size = w * h * 3 // 2
    frames = []
    while body:
        marker, _, body = body.partition(b"\n")
        assert marker.startswith(b"FRAME"), marker[:20]
        raw = np.frombuffer(body[:size], np.uint8)
        assert raw.size == size, "truncated frame"
        frames.append(raw)
        body = body[size:]
    return info, frames


def test_vspipe_y4m_end_to_end(script, plugin_path, generic_bundle):
    done = run_vspipe(script, plugin_path, generic_bundle)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    info, frames = parse_y4m(done.stdout)
    assert (int(info["W"]), int(info["H"]), len(frames)) == (2 * W, 2 * H, FRAMES)
    assert info["C"].startswith("420")

    # the same graph in this process gives the same bytes
    env = {"plugin": plugin_path, "model": str(generic_bundle), "fail_at": "-1", "source": "yuv"}
    exec(compile(SCRIPT, str(script), "exec"), env)
    local = vs.get_output(0)
    if isinstance(local, vs.VideoOutputTuple):
        local = local.clip
    for n, raw in enumerate(frames):
        f = local.get_frame(n)
        expected = np.concatenate([np.asarray(f[p]).ravel() for p in range(3)])
        assert np.array_equal(raw, expected), f"frame {n}"
    vs.clear_output(0)


def test_vspipe_fails_on_a_failing_frame(script, plugin_path, generic_bundle):
    done = run_vspipe(script, plugin_path, generic_bundle, fail_at=3)
    assert done.returncode != 0
    assert b"selftransfer.Upscale: RuntimeError: injected backend failure" in done.stderr


def test_vspipe_fails_at_evaluation_on_a_gray_clip(script, plugin_path, generic_bundle):
    done = run_vspipe(script, plugin_path, generic_bundle, source="gray")
    assert done.returncode != 0
    assert b"selftransfer.Upscale: clip: Gray8 is not supported" in done.stderr
    assert not done.stdout  # nothing written


def test_python_helper_takes_exactly_the_plugins_arguments(plugin_path, tiny_bundle):
    """vs_selftransfer.upscale() mirrors core.selftransfer.Upscale: the same keyword arguments (so a new plugin
    argument cannot be missing from it), and each reaches the plugin (``reuse`` shown by its own range check)."""
    import inspect

    import vs_selftransfer

    core = vs.core
    registered = [a.split(":")[0] for a in core.selftransfer.Upscale.signature.split(";") if a]
    helper = list(inspect.signature(vs_selftransfer.upscale).parameters)
    assert helper == registered, (helper, registered)
    blank = core.std.BlankClip(format=vs.RGBS, width=W, height=H, length=3, color=[0.2, 0.5, 0.7])
    outputs = [vs_selftransfer.upscale(blank, tiny_bundle, backend="ort", reuse=reuse) for reuse in (False, True, 1)]
    for n in range(3):  # identical frames: reuse returns the stored output, which is what the network computes
        frames = [clip.get_frame(n) for clip in outputs]
        for other in frames[1:]:
            for p in range(3):
                assert np.array_equal(np.asarray(frames[0][p]), np.asarray(other[p]))
    with pytest.raises(vs.Error, match="reuse"):
        vs_selftransfer.upscale(blank, tiny_bundle, backend="ort", reuse=2)
