"""core.selftransfer.Upscale through VapourSynth: output against PyTorch, every input format family, colorimetry and
frame props, tiling, the stream pool, every argument's error, bad clips and bundles, failing frames.

The plugin under test is the one VapourSynth autoloads (installed with ``pip install .``, or the dev build through
VAPOURSYNTH_EXTRA_PLUGIN_PATH=build/vsplugin); when neither is loaded, the in-place build is made (if missing or
older than its source) and loaded with std.LoadPlugin.
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import threading
import time
import zipfile

import numpy as np
import pytest

# vs-mlrt's core.ov plugin (installed with the bench extra) ships its own libopenvino; when VapourSynth autoloads
# it first, OpenVINO's Python package refuses to import in that process. Importing OpenVINO before the first core is
# made lets both share one library, so the ov backend can be tested here (see the ov backend's available()).
try:
    import openvino  # noqa: F401
except ImportError:
    pass

import vapoursynth as vs  # noqa: E402

from conftest import ROOT  # noqa: E402
import vs_selftransfer  # noqa: E402
from vs_selftransfer import runtime, tiling  # noqa: E402
from vs_selftransfer.bundle import MANIFEST  # noqa: E402

PLUGIN_SOURCE = ROOT / "vs_selftransfer" / "plugin" / "selftransfer.c"
DEV_PLUGIN = ROOT / "build" / "vsplugin" / "libselftransfer.so"
FUNC = "selftransfer.Upscale"
H, W = 48, 64  # small frames: CARN-M runs them in milliseconds


def ensure_plugin(core) -> str:
    """Path of the plugin VapourSynth uses: autoloaded, else the in-place build (built now if missing or stale)."""
    if not hasattr(core, "selftransfer"):
        if not DEV_PLUGIN.exists() or DEV_PLUGIN.stat().st_mtime < PLUGIN_SOURCE.stat().st_mtime:
            build = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=ROOT,
                                   capture_output=True, text=True, timeout=600)
            assert build.returncode == 0, f"building the plugin failed:\n{build.stdout[-2000:]}{build.stderr[-4000:]}"
        core.std.LoadPlugin(str(DEV_PLUGIN))
    return core.selftransfer.Version()["plugin_path"]


@pytest.fixture(scope="module")
def core():
    c = vs.core
    ensure_plugin(c)
    return c


# -- clips from arrays and back -------------------------------------------------------------------------------------

def rgbs_clip(core, frames: np.ndarray) -> vs.VideoNode:
    """An RGBS clip whose frame n holds frames[n] ((N, 3, H, W) float32)."""
    frames = np.ascontiguousarray(frames, dtype=np.float32)
    n, _, h, w = frames.shape
    blank = core.std.BlankClip(format=vs.RGBS, width=w, height=h, length=n, keep=True)

    def fill(n, f):
        out = f.copy()
        for p in range(3):
            np.asarray(out[p])[:] = frames[n, p]
        return out

    return core.std.ModifyFrame(blank, blank, fill)


def planes(frame: vs.VideoFrame) -> list[np.ndarray]:
    return [np.array(frame[p], dtype=np.float64) for p in range(frame.format.num_planes)]


def max_diff(a: vs.VideoFrame, b: vs.VideoFrame) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(planes(a), planes(b)))


@pytest.fixture(scope="module")
def frames(reference_path) -> np.ndarray:
    """Three 48x64 RGB frames: two crops of a real video frame and uniform noise."""
    real = np.load(reference_path)["input_uint8_rgb_hwc"].astype(np.float32).transpose(2, 0, 1) / 255
    noise = np.random.default_rng(0).random((3, H, W), dtype=np.float32)
    return np.stack([real[:, :H, :W], real[:, -H:, ::-1][:, :, :W], noise])


@pytest.fixture(scope="module")
def torch_output(generic_bundle, frames) -> np.ndarray:
    """The bundle's network in PyTorch on the same frames: the reference."""
    import torch

    from vs_selftransfer.bundle import Bundle

    model = Bundle.open(generic_bundle).torch_model()
    with torch.no_grad():
        return model(torch.from_numpy(frames)).numpy()


def upscale(core, clip, model, **kw):
    kw.setdefault("backend", "ort")  # the data-only default backend, no compile step: the quickest to open
    return core.selftransfer.Upscale(clip, model=str(model), **kw)


# -- accuracy -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["ort", "ov", "torch", "auto"])
def test_rgbs_output_matches_pytorch(core, generic_bundle, frames, torch_output, backend):
    if backend != "auto" and (reason := importlib.import_module(runtime.BACKENDS[backend]).available("cpu")):
        pytest.skip(f"{backend} backend unavailable here: {reason}")
    out = upscale(core, rgbs_clip(core, frames), generic_bundle, backend=backend)
    assert (out.format.id, out.width, out.height, out.num_frames) == (vs.RGBS, 2 * W, 2 * H, len(frames))
    for n in range(len(frames)):
        got = np.stack(planes(out.get_frame(n)))
        assert np.abs(got - np.clip(torch_output[n], 0, 1)).max() <= 1e-4, f"frame {n}"


def test_constant_gray_stays_constant(core, generic_bundle):
    clip = core.std.BlankClip(format=vs.RGBS, width=W, height=H, length=1, color=[0.5, 0.5, 0.5])
    out = np.stack(planes(upscale(core, clip, generic_bundle).get_frame(0)))
    assert np.abs(out - 0.5).max() < 0.01


# every family: RGB and YUV, 8-16 bit integer, half, single; 4:2:0, 4:2:2, 4:4:4 and an odd one (4:1:0)
FORMATS = [vs.RGB24, vs.RGB30, vs.RGB48, vs.RGBH, vs.YUV420P8, vs.YUV420P10, vs.YUV422P16, vs.YUV444P8,
           vs.YUV444PH, vs.YUV444PS, vs.YUV410P8]


def expected_output(core, src: vs.VideoNode, torch_frames: np.ndarray, matrix: str, range_: str, chromaloc: str):
    """What Upscale must return for ``src``: its RGB (decoded with its own props) through the network, clamped to
    [0, 1], encoded back with the given colorimetry (float YUV limited to Y [0, 1], chroma [-0.5, 0.5])."""
    fmt = src.format
    upscaled = rgbs_clip(core, np.clip(torch_frames, 0, 1))
    if fmt.color_family == vs.RGB:
        return core.resize.Point(upscaled, format=fmt.id, range_s=range_)
    out = core.resize.Bicubic(upscaled, format=fmt.id, matrix_s=matrix, range_s=range_, chromaloc_s=chromaloc)
    if fmt.sample_type == vs.FLOAT:
        out = core.std.Limiter(out, min=[0, -0.5, -0.5], max=[1, 0.5, 0.5])
    return out


def decoded_reference(core, generic_bundle, src: vs.VideoNode) -> np.ndarray:
    """PyTorch on ``src`` decoded to RGB by the resizer from the frames' own props."""
    import torch

    from vs_selftransfer.bundle import Bundle

    rgb = core.resize.Bicubic(src, format=vs.RGBS)
    x = np.stack([np.stack(planes(f)) for f in rgb.frames()]).astype(np.float32)
    with torch.no_grad():
        return Bundle.open(generic_bundle).torch_model()(torch.from_numpy(x)).numpy()


def tolerance(fmt: vs.VideoFormat) -> float:
    """ONNX Runtime vs PyTorch differ by up to ~1e-4 in RGB: one code value after rounding, a little more where the
    YUV matrix amplifies it; half floats carry 11 significant bits."""
    if fmt.sample_type == vs.INTEGER:
        return 1 + 3e-4 * ((1 << fmt.bits_per_sample) - 1)
    return 2e-3 if fmt.bits_per_sample == 16 else 3e-4


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: vs.core.get_video_format(f).name)
def test_input_formats(core, generic_bundle, frames, fmt):
    fmt = core.get_video_format(fmt)
    rgb = rgbs_clip(core, frames)
    if fmt.color_family == vs.RGB:
        src = core.resize.Point(rgb, format=fmt.id)
    else:
        src = core.resize.Bicubic(rgb, format=fmt.id, matrix_s="709", range_s="limited", chromaloc_s="left")
    out = upscale(core, src, generic_bundle)
    assert (out.format.id, out.width, out.height, out.num_frames) == (fmt.id, 2 * W, 2 * H, len(frames))
    want = expected_output(core, src, decoded_reference(core, generic_bundle, src), "709", "limited" if
                           fmt.color_family == vs.YUV else "full", "left")
    for n in range(len(frames)):
        assert max_diff(out.get_frame(n), want.get_frame(n)) <= tolerance(fmt), f"frame {n}"


NOMINAL = {vs.RGB: ([0, 0, 0], [1, 1, 1]), vs.YUV: ([0, -0.5, -0.5], [1, 0.5, 0.5])}


@pytest.mark.parametrize("fmt", [vs.RGBS, vs.RGBH, vs.YUV444PS, vs.YUV444PH],
                         ids=lambda f: vs.core.get_video_format(f).name)
def test_float_outputs_are_clamped_to_the_nominal_range(core, generic_bundle, frames, torch_output, fmt):
    """On the noise frame the network overshoots both ways; float outputs are clamped like integer ones: RGB to
    [0, 1] (both bounds reached), YUV to Y [0, 1] and chroma [-0.5, 0.5]."""
    assert torch_output[2].min() < -0.1 and torch_output[2].max() > 1.1  # the test can fail
    fmt = core.get_video_format(fmt)
    rgb = rgbs_clip(core, frames[2:])
    src = (core.resize.Point(rgb, format=fmt.id) if fmt.color_family == vs.RGB else
           core.resize.Point(rgb, format=fmt.id, matrix_s="709"))
    low, high = NOMINAL[fmt.color_family]
    for p, plane in enumerate(planes(upscale(core, src, generic_bundle).get_frame(0))):
        assert low[p] <= plane.min() and plane.max() <= high[p], (p, plane.min(), plane.max())
        if fmt.color_family == vs.RGB:
            assert plane.min() == 0 and plane.max() == 1


def test_float_yuv_chroma_is_limited_after_subsampling(core, generic_bundle):
    """Saturated blue/yellow stripes: 4:2:0 chroma resampling overshoots [-0.5, 0.5] even from RGB in [0, 1]; the
    float YUV output is limited to the nominal range as an integer one is to its code range."""
    img = np.zeros((1, 3, H, W), np.float32)
    img[0, 2] = 1  # blue
    for x in range(3, W, 8):
        img[0, :, :, x:x + 4] = np.array([1, 1, 0], np.float32)[:, None, None]  # yellow stripes
    src = core.resize.Point(rgbs_clip(core, img), format=vs.YUV420PS, matrix_s="709")  # sharp chroma
    got = planes(upscale(core, src, generic_bundle).get_frame(0))
    unlimited = core.resize.Bicubic(upscale(core, core.resize.Bicubic(src, format=vs.RGBS), generic_bundle),
                                    format=vs.YUV420PS, matrix_s="709")
    assert np.abs(planes(unlimited.get_frame(0))[1]).max() > 0.51  # the test can fail
    low, high = NOMINAL[vs.YUV]
    for p, plane in enumerate(got):
        assert low[p] <= plane.min() and plane.max() <= high[p], (p, plane.min(), plane.max())
    assert np.abs(got[1]).max() == 0.5


def test_yuv_colorimetry_comes_from_the_clip(core, generic_bundle, frames):
    """A full-range BT.601 (470bg) clip with centred chroma is decoded and re-encoded as such, not as the defaults."""
    src = core.resize.Bicubic(rgbs_clip(core, frames), format=vs.YUV420P8, matrix_s="470bg", range_s="full",
                              chromaloc_s="center")
    out = upscale(core, src, generic_bundle)
    reference = decoded_reference(core, generic_bundle, src)
    want = expected_output(core, src, reference, "470bg", "full", "center")
    as_defaults = expected_output(core, src, reference, "709", "limited", "left")
    for n in range(len(frames)):
        got = out.get_frame(n)
        assert max_diff(got, want.get_frame(n)) <= 1
        assert max_diff(got, as_defaults.get_frame(n)) > 5  # the test could tell the difference
        assert got.props["_Matrix"] == 5 and got.props["_Range"] == 1 and got.props["_ChromaLocation"] == 1


def test_yuv_defaults_without_props(core, generic_bundle, frames):
    """No colorimetry props: BT.601 (170m) at SD sizes, limited range, left chroma; the output stays unlabelled."""
    src = core.resize.Bicubic(rgbs_clip(core, frames), format=vs.YUV420P10, matrix_s="170m", range_s="limited",
                              chromaloc_s="left")
    src = core.std.RemoveFrameProps(src, props=["_Matrix", "_Range", "_ChromaLocation"])
    out = upscale(core, src, generic_bundle)
    labelled = core.std.SetFrameProps(src, _Matrix=6, _Range=0, _ChromaLocation=0)
    want = expected_output(core, labelled, decoded_reference(core, generic_bundle, labelled), "170m", "limited",
                           "left")
    got = out.get_frame(0)
    assert max_diff(got, want.get_frame(0)) <= tolerance(src.format)
    assert not {"_Matrix", "_Range", "_ChromaLocation"} & set(got.props)


@pytest.mark.parametrize("fmt", [vs.RGBS, vs.YUV420P8])
def test_frame_props_are_kept(core, generic_bundle, frames, fmt):
    rgb = rgbs_clip(core, frames)
    src = rgb if fmt == vs.RGBS else core.resize.Bicubic(rgb, format=fmt, matrix_s="709")
    src = core.std.SetFrameProps(src, SceneName="intro", Weight=0.25, Index=7, _SARNum=4, _SARDen=3,
                                 _FieldBased=0)
    out = upscale(core, src, generic_bundle)
    for n in (0, 2):
        assert dict(out.get_frame(n).props) == dict(src.get_frame(n).props)


# -- tiling and streams ---------------------------------------------------------------------------------------------

def test_tiled_output_equals_untiled(core, generic_bundle, frames):
    clip = rgbs_clip(core, frames)
    whole = upscale(core, clip, generic_bundle, tilesize=[0])
    tiled = upscale(core, clip, generic_bundle, tilesize=[16], overlap=24)
    uneven = upscale(core, clip, generic_bundle, tilesize=[24, 16], overlap=24)
    seams = upscale(core, clip, generic_bundle, tilesize=[16], overlap=0)
    for n in range(len(frames)):
        reference = whole.get_frame(n)
        assert max_diff(tiled.get_frame(n), reference) <= 1e-4
        assert max_diff(uneven.get_frame(n), reference) <= 1e-4
        assert max_diff(seams.get_frame(n), reference) > 1e-3  # without context the tiles show: tiling did happen


class ConcurrencyProbe:
    """Wraps the runtime's tiling call: records how many frames are inside it at once, and which window buffers
    (one per stream slot) they use, holding each call long enough for the others to arrive."""

    def __init__(self, real):
        self.real, self.lock = real, threading.Lock()
        self.active, self.peak, self.calls, self.shared_slot = {}, 0, 0, False

    def __call__(self, run, src, dst, scale, tile=0, overlap=0, buffer=None, reuse=None):
        with self.lock:
            self.shared_slot |= id(buffer) in self.active.values()
            key = object()
            self.active[key] = id(buffer)
            self.peak = max(self.peak, len(self.active))
            self.calls += 1
        try:
            time.sleep(0.05)
            return self.real(run, src, dst, scale, tile, overlap, buffer, reuse)
        finally:
            with self.lock:
                del self.active[key]


@pytest.mark.parametrize("num_streams", [1, 2])
def test_streams_bound_concurrency(core, generic_bundle, frames, monkeypatch, num_streams):
    clip = rgbs_clip(core, np.concatenate([frames, frames[::-1], frames]))
    reference = upscale(core, clip, generic_bundle, num_streams=1, threads=1)
    reference_frames = [np.stack(planes(f)) for f in reference.frames()]
    probe = ConcurrencyProbe(runtime.tiled_upscale)
    monkeypatch.setattr(runtime, "tiled_upscale", probe)
    threads_before = core.num_threads
    core.num_threads = 4  # more requesters than streams
    try:
        out = upscale(core, clip, generic_bundle, num_streams=num_streams, threads=1)
        got = [np.stack(planes(f)) for f in out.frames()]
    finally:
        core.num_threads = threads_before
    assert probe.calls == len(got) == clip.num_frames
    assert probe.peak == num_streams
    assert not probe.shared_slot
    for n, (a, b) in enumerate(zip(got, reference_frames)):
        assert np.abs(a - b).max() <= 1e-5, f"frame {n}"


# -- errors ---------------------------------------------------------------------------------------------------------

# One invalid value per registered optional argument, and the start of the error it must produce.
INVALID_ARGUMENTS = {
    "backend": ("tensorflow", "backend: unknown backend 'tensorflow'"),
    "device": ("tpu", "device: must be"),
    "tilesize": ([64, 48, 2], "tilesize: give one size or [width, height]"),
    "overlap": (-1, "overlap: must be between"),
    "num_streams": (0, "num_streams: must be between"),
    "precision": ("fp64", "precision: must be auto or one of"),
    "threads": (-2, "threads: must be between"),
    "scale": (3, "scale: the bundle"),
    "reuse": (2, "reuse: must be between 0 and 1"),
}


def test_every_argument_is_read_and_checked(core, tiny_bundle):
    signature = core.selftransfer.Upscale.signature
    registered = [part.split(":")[0] for part in signature.split(";") if part]
    assert registered[:2] == ["clip", "model"]
    assert set(registered[2:]) == set(INVALID_ARGUMENTS), "every plugin argument needs an entry here"
    clip = core.std.BlankClip(format=vs.RGBS, width=W, height=H, length=1)
    for name, (value, message) in INVALID_ARGUMENTS.items():
        with pytest.raises(vs.Error) as e:
            core.selftransfer.Upscale(clip, model=str(tiny_bundle), **{name: value})
        assert str(e.value).startswith(f"{FUNC}: {message}"), (name, str(e.value))


def test_tilesize_values_are_checked(core, tiny_bundle):
    clip = core.std.BlankClip(format=vs.RGBS, width=W, height=H, length=1)
    for bad in ([-1], [4], [16, 3], [1 << 17]):
        with pytest.raises(vs.Error, match=f"{FUNC}: tilesize: each size must be 0"):
            core.selftransfer.Upscale(clip, model=str(tiny_bundle), tilesize=bad)


def rewrite_bundle(src, dst, change) -> None:
    """Copy a bundle zip member by member, letting ``change(name, data)`` alter each one."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, change(info.filename, zin.read(info.filename)))


def test_bad_bundles(core, tiny_bundle, tmp_path):
    clip = core.std.BlankClip(format=vs.RGB24, width=W, height=H, length=1)

    def error(model) -> str:
        with pytest.raises(vs.Error) as e:
            core.selftransfer.Upscale(clip, model=str(model))
        return str(e.value)

    assert error(tmp_path / "missing.stm") == f"{FUNC}: model: file not found: {tmp_path / 'missing.stm'}"
    assert error(tmp_path) == f"{FUNC}: model: {tmp_path} is a directory, not a .stm bundle"

    garbage = tmp_path / "garbage.stm"
    garbage.write_bytes(np.random.default_rng(1).bytes(4096))
    assert error(garbage).startswith(f"{FUNC}: model: {garbage}: not a selftransfer bundle")

    truncated = tmp_path / "truncated.stm"
    truncated.write_bytes(tiny_bundle.read_bytes()[: tiny_bundle.stat().st_size // 2])
    assert error(truncated).startswith(f"{FUNC}: model: {truncated}: ")

    tampered = tmp_path / "tampered.stm"
    rewrite_bundle(tiny_bundle, tampered, lambda name, data: data[:-1] + bytes([data[-1] ^ 1])
                   if name == "model.onnx" else data)
    assert "model.onnx does not match its sha256" in error(tampered)

    def edit_manifest(edit):
        def change(name, data):
            if name != MANIFEST:
                return data
            manifest = json.loads(data)
            edit(manifest)
            return json.dumps(manifest).encode()
        return change

    future = tmp_path / "future.stm"
    rewrite_bundle(tiny_bundle, future, edit_manifest(lambda m: m.update(format_version=99)))
    assert "bundle format version 99 is not supported" in error(future)

    bgr = tmp_path / "bgr.stm"
    rewrite_bundle(tiny_bundle, bgr, edit_manifest(lambda m: m["input"].update(channels="BGR")))
    assert error(bgr).startswith(f"{FUNC}: model: {bgr}: manifest input must be")

    pickled = tmp_path / "pickled.stm"
    with zipfile.ZipFile(tiny_bundle) as zin, zipfile.ZipFile(pickled, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))
        zout.writestr("weights.pth", b"\x80\x04K\x01.")  # a pickle
    assert "unknown member 'weights.pth'" in error(pickled)


def test_undecodable_model_paths_are_shown_escaped(core, tiny_bundle, tmp_path):
    """A file name that is not UTF-8 reaches the plugin as bytes; it works, and errors show its bad bytes escaped."""
    clip = core.std.BlankClip(format=vs.RGB24, width=W, height=H, length=1)
    folder = os.fsencode(tmp_path)

    def error(model: bytes) -> str:
        with pytest.raises(vs.Error) as e:
            core.selftransfer.Upscale(clip, model=model)
        return str(e.value)

    assert error(folder + b"/caf\xe9.stm") == f"{FUNC}: model: file not found: {tmp_path}/caf\\xe9.stm"
    (tmp_path / os.fsdecode(b"garbage\xff\xfe.stm")).write_bytes(b"not a zip file" * 100)
    assert error(folder + b"/garbage\xff\xfe.stm").startswith(
        f"{FUNC}: model: {tmp_path}/garbage\\xff\\xfe.stm: not a selftransfer bundle")
    bundle = folder + b"/tiny\xe9.stm"
    os.link(tiny_bundle, bundle)
    assert core.selftransfer.Upscale(clip, model=bundle, backend="ort").get_frame(0).width == 2 * W


def test_bad_clips(core, tiny_bundle):
    model = str(tiny_bundle)
    cases = {
        "Gray8 is not supported": core.std.BlankClip(format=vs.GRAY8, width=W, height=H),
        "GrayS is not supported": core.std.BlankClip(format=vs.GRAYS, width=W, height=H),
        "variable-format clips are not supported": core.std.Splice(
            [core.std.BlankClip(format=vs.RGB24), core.std.BlankClip(format=vs.YUV420P8)], mismatch=True),
        "variable-size clips are not supported": core.std.Splice(
            [core.std.BlankClip(format=vs.RGB24), core.std.BlankClip(format=vs.RGB24, width=32)], mismatch=True),
    }
    for message, clip in cases.items():
        with pytest.raises(vs.Error, match=f"^{FUNC}: clip: .*{message}"):
            core.selftransfer.Upscale(clip, model=model)
    rgb_matrix = core.std.SetFrameProps(core.std.BlankClip(format=vs.YUV420P8, width=W, height=H), _Matrix=0)
    with pytest.raises(vs.Error, match=f"^{FUNC}: clip: frame 0 of this YUV clip has _Matrix=0"):
        core.selftransfer.Upscale(rgb_matrix, model=model)


def test_unavailable_backends(core, tiny_bundle):
    import torch

    clip = core.std.BlankClip(format=vs.RGBS, width=W, height=H, length=1)
    with pytest.raises(vs.Error, match=f"^{FUNC}: backend: 'trt' is not available on cpu: TensorRT runs only"):
        core.selftransfer.Upscale(clip, model=str(tiny_bundle), backend="trt")
    if not torch.cuda.is_available():
        with pytest.raises(vs.Error, match=f"^{FUNC}: backend: 'torch' is not available on cuda: no CUDA device"):
            core.selftransfer.Upscale(clip, model=str(tiny_bundle), backend="torch", device="cuda")
    with pytest.raises(vs.Error, match=f"^{FUNC}: backend 'ort' \\(fp16 on cpu\\): the ort backend runs fp32"):
        core.selftransfer.Upscale(clip, model=str(tiny_bundle), backend="ort", precision="fp16")


def test_failing_frame_raises_through_vapoursynth(core, tiny_bundle, monkeypatch):
    clip = core.std.BlankClip(format=vs.YUV420P8, width=W, height=H, length=2)
    out = upscale(core, clip, tiny_bundle)

    def broken(*args, **kwargs):
        raise RuntimeError("injected backend failure")

    monkeypatch.setattr(runtime, "tiled_upscale", broken)
    with pytest.raises(vs.Error, match=f"{FUNC}: RuntimeError: injected backend failure"):
        out.get_frame(0)
    monkeypatch.undo()
    assert out.get_frame(1).width == 2 * W  # the filter still works once the backend does


def test_runtime_may_not_keep_frame_memory(core, tiny_bundle, monkeypatch):
    kept = []
    real = runtime.tiled_upscale

    def keeping(run, src, dst, *args, **kwargs):
        kept.append(dst[0])  # an array into the output frame, kept past the call: must be refused
        return real(run, src, dst, *args, **kwargs)

    monkeypatch.setattr(runtime, "tiled_upscale", keeping)
    out = upscale(core, core.std.BlankClip(format=vs.RGBS, width=W, height=H, length=2), tiny_bundle)
    with pytest.raises(vs.Error, match=f"{FUNC}: the runtime kept a reference to frame memory"):
        out.get_frame(0)
    kept[0][:] = 0.5  # the frame's memory was kept allocated for it (see test_plugin_lifetime.py)
    kept.clear()
    monkeypatch.undo()
    assert out.get_frame(1).width == 2 * W


def test_plane_views_are_released_after_the_call(core, tiny_bundle, monkeypatch):
    """The plugin's own plane objects may be kept: they are released memoryviews, no way into the frame."""
    kept = []
    real = runtime.Upscaler.process

    def keeping(self, slot, n, src_planes, dst_planes):
        kept.extend([*src_planes, *dst_planes])
        return real(self, slot, n, src_planes, dst_planes)

    monkeypatch.setattr(runtime.Upscaler, "process", keeping)
    out = upscale(core, core.std.BlankClip(format=vs.YUV420P8, width=W, height=H, length=1), tiny_bundle)
    assert out.get_frame(0).width == 2 * W
    assert len(kept) == 6
    for view in kept:
        assert isinstance(view, memoryview)
        with pytest.raises(ValueError, match="released memoryview"):
            memoryview(view)  # what numpy and every other consumer starts with
        with pytest.raises(ValueError, match="released memoryview"):
            view[0, 0]


def test_plane_views_describe_the_frames(core, tiny_bundle, monkeypatch):
    """Source planes are read-only, output planes writable, both float32 (H, W) with the frame's row stride."""
    seen = []
    real = runtime.Upscaler.process

    def looking(self, slot, n, src_planes, dst_planes):
        seen.extend((v.format, v.shape, v.strides[1], v.strides[0] >= 4 * v.shape[1], v.readonly)
                    for v in (*src_planes, *dst_planes))
        return real(self, slot, n, src_planes, dst_planes)

    monkeypatch.setattr(runtime.Upscaler, "process", looking)
    upscale(core, core.std.BlankClip(format=vs.RGBS, width=W - 3, height=H, length=1), tiny_bundle).get_frame(0)
    assert seen == [("f", (H, W - 3), 4, True, True)] * 3 + [("f", (2 * H, 2 * W - 6), 4, True, False)] * 3


# -- the rest of the interface --------------------------------------------------------------------------------------

def test_version(core):
    version = core.selftransfer.Version()
    assert version["plugin_version"] == vs_selftransfer.__version__ == version["selftransfer"]
    assert version["vapoursynth_api"] == "4.2"
    assert version["runtime"] == runtime.__file__
    assert version["python"] == sys.version
    assert version["plugin_path"].endswith("libselftransfer.so")
    for library in ("numpy", "onnxruntime", "openvino", "torch", "torch_tensorrt"):
        assert version[library]


def test_python_helper(core, tiny_bundle, frames):
    clip = rgbs_clip(core, frames)
    direct = core.selftransfer.Upscale(clip, model=str(tiny_bundle), backend="ort", tilesize=[32])
    helper = vs_selftransfer.upscale(clip, tiny_bundle, backend="ort", tilesize=32)
    assert max_diff(helper.get_frame(1), direct.get_frame(1)) == 0
    with pytest.raises(TypeError):
        vs_selftransfer.upscale(clip, tiny_bundle, tile=32)


def test_runtime_defaults():
    assert runtime.default_parallelism("cpu", None, None, cores=2) == (1, 2)
    assert runtime.default_parallelism("cpu", 2, None, cores=2) == (2, 1)
    assert runtime.default_parallelism("cpu", None, 1, cores=8) == (8, 1)
    assert runtime.default_parallelism("cpu", 3, 0, cores=2) == (3, 1)
    assert runtime.default_parallelism("cpu", 4, 4, cores=2) == (4, 4)  # both given: the user's call
    assert runtime.default_parallelism("cuda", None, None, cores=16) == (1, 1)
    assert runtime.parse_tilesize(None, 640, 360) == (0, 0)
    assert runtime.parse_tilesize(None, 1920, 1080) == (tiling.AUTO_TILE, tiling.AUTO_TILE)
    assert runtime.parse_tilesize([128, 64], 1920, 1080) == (64, 128)
    assert runtime.parse_tilesize(96, 1920, 1080) == (96, 96)


def test_default_overlap_covers_the_receptive_field():
    from vs_selftransfer.model import RECEPTIVE_RADIUS

    assert tiling.OVERLAP >= RECEPTIVE_RADIUS  # the overlap the runtime defaults to


@pytest.mark.gpu
@pytest.mark.parametrize("backend,precision,tol", [("torch", "fp32", 5e-3), ("torch", "fp16", 3e-2),
                                                   ("trt", "fp16", 3e-2), ("auto", "fp32", 5e-3)])
def test_cuda_backends(core, generic_bundle, frames, torch_output, backend, precision, tol):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if backend != "auto" and (reason := importlib.import_module(runtime.BACKENDS[backend]).available("cuda")):
        pytest.skip(f"{backend} backend unavailable: {reason}")
    out = upscale(core, rgbs_clip(core, frames), generic_bundle, backend=backend, device="cuda",
                  precision=precision)
    for n in range(len(frames)):
        assert np.abs(np.stack(planes(out.get_frame(n))) - np.clip(torch_output[n], 0, 1)).max() <= tol


def test_exact_temporal_reuse_is_lossless(core, tiny_bundle):
    """A static clip with one moving corner: reuse on and off give bit-identical frames."""
    rng = np.random.default_rng(5)
    base = rng.random((3, 48, 64), dtype=np.float32)
    blank = core.std.BlankClip(format=vs.RGBS, width=64, height=48, length=4, keep=True)

    def fill(n, f):
        fout = f.copy()
        img = base.copy()
        img[:, 40:, 56:] += 0.1 * n  # only the bottom-right corner changes over time
        for p in range(3):
            np.asarray(fout[p])[:] = img[p]
        return fout

    clip = core.std.ModifyFrame(blank, blank, fill)
    outs = {}
    for reuse in (0, 1):
        up = core.selftransfer.Upscale(clip, model=str(tiny_bundle), backend="ort", tilesize=16, overlap=8,
                                       num_streams=1, threads=1, reuse=reuse)
        outs[reuse] = [np.stack([np.asarray(f[p]).copy() for p in range(3)]) for f in up.frames()]
    for a, b in zip(outs[0], outs[1]):
        assert np.array_equal(a, b)
