"""One colour-matrix rule for untagged video: the frames the trainer learns from are the frames the filter feeds the
model, at every size class (vs_selftransfer.colour.default_matrix: BT.601 up to 1024x576, BT.709 above).

Each case encodes a real untagged YUV video of that size (lossless FFV1, colour bands whose RGB differs clearly
between BT.601 and BT.709), decodes it with the training decoder (selftransfer_trainer.video.read_frames) and with
the plugin's own YUV -> RGB path (BestSource -> core.selftransfer.Upscale, the RGB planes captured where the runtime
receives them), and checks that both equal the RGB of the same matrix, and that it is the rule's.
"""
from __future__ import annotations

import subprocess

import numpy as np
import pytest
import vapoursynth as vs

from test_plugin import ensure_plugin
from vs_selftransfer import colour, runtime

# (Y, Cb, Cr) 8-bit limited range: saturated colours whose RGB is inside [0, 255] under both matrices.
BANDS = np.array([[100, 190, 210], [150, 60, 50], [110, 80, 190], [140, 180, 70]], np.float64)
KR_KB = {colour.MATRIX_ST170M: (0.299, 0.114), colour.MATRIX_BT709: (0.2126, 0.0722)}

SIZES = [(640, 360), (720, 480), (720, 576), (1024, 576), (1025, 576), (1024, 577), (1100, 600), (1280, 720),
         (1920, 1080), (576, 1024)]  # the last one portrait: SD width, HD height


def yuv_to_rgb(yuv: np.ndarray, matrix: int) -> np.ndarray:
    """Limited-range 8-bit YCbCr -> RGB in 0..255 (floats), ITU-R BT.601 / BT.709 equations."""
    kr, kb = KR_KB[matrix]
    kg = 1 - kr - kb
    y = (yuv[..., 0] - 16) / 219
    cb, cr = (yuv[..., 1] - 128) / 224, (yuv[..., 2] - 128) / 224
    r = y + 2 * (1 - kr) * cr
    b = y + 2 * (1 - kb) * cb
    g = (y - kr * r - kb * b) / kg
    return np.stack([r, g, b], -1) * 255


def band_columns(width: int) -> list[slice]:
    """The interior of each vertical band (8 px from its edges, away from chroma interpolation)."""
    edges = np.linspace(0, width, len(BANDS) + 1).astype(int)
    return [slice(a + 8, b - 8) for a, b in zip(edges[:-1], edges[1:])]


def make_video(path, width: int, height: int) -> None:
    """Two frames of vertical colour bands, untagged (no matrix, range or primaries), lossless."""
    edges = np.linspace(0, width, len(BANDS) + 1).astype(int)
    yuv = np.empty((height, width, 3), np.uint8)
    for (a, b), value in zip(zip(edges[:-1], edges[1:]), BANDS):
        yuv[:, a:b] = value
    # 4:2:0 where both sides are even (what real video is), else 4:4:4 (odd sizes cannot subsample evenly)
    subsampled = width % 2 == 0 and height % 2 == 0
    planes = [yuv[..., 0]] + [yuv[::2, ::2, c] if subsampled else yuv[..., c] for c in (1, 2)]
    raw = b"".join(np.ascontiguousarray(p).tobytes() for p in planes) * 2
    pix_fmt = "yuv420p" if subsampled else "yuv444p"
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", pix_fmt, "-s",
                    f"{width}x{height}", "-r", "25", "-i", "pipe:0", "-c:v", "ffv1", str(path)], input=raw,
                   check=True, timeout=120)
    probe = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries",
                            "stream=color_space,color_primaries,color_transfer", "-of", "csv=p=0", str(path)],
                           capture_output=True, text=True, check=True, timeout=60)
    assert set(probe.stdout.strip().split(",")) <= {"unknown", ""}, probe.stdout  # really untagged


def plugin_rgb(core, path, bundle, monkeypatch) -> np.ndarray:
    """Frame 0 as the plugin converts it for the model: (H, W, 3) RGB in 0..255 (floats)."""
    captured = {}

    def capture(self, slot, n, src_planes, dst_planes):
        captured[n] = np.stack([np.array(p) for p in src_planes], -1) * 255

    monkeypatch.setattr(runtime.Upscaler, "process", capture)  # the model is not run: only its input matters
    clip = core.bs.VideoSource(str(path), cachemode=0)
    assert clip.get_frame(0).props.get("_Matrix", 2) == 2  # the source filter sees no matrix either
    core.selftransfer.Upscale(clip, model=str(bundle), backend="ort").get_frame(0)
    return captured[0]


def matching_matrix(rgb: np.ndarray, width: int, tolerance: float) -> int | None:
    """The matrix whose RGB every band's interior equals (within tolerance levels), if one does."""
    found = []
    for matrix in KR_KB:
        expected = yuv_to_rgb(BANDS, matrix)
        if all(np.abs(rgb[:, cols] - want).max() <= tolerance for cols, want in zip(band_columns(width), expected)):
            found.append(matrix)
    return found[0] if len(found) == 1 else None


@pytest.fixture(scope="module")
def core():
    c = vs.core
    ensure_plugin(c)
    if not hasattr(c, "bs"):
        pytest.skip("BestSource (pip: vapoursynth-bestsource) is not installed")
    return c


def test_the_bands_tell_the_matrices_apart():
    difference = np.abs(yuv_to_rgb(BANDS, colour.MATRIX_ST170M) - yuv_to_rgb(BANDS, colour.MATRIX_BT709))
    assert difference.max(axis=1).min() > 10  # every band differs by more than 10 levels in some channel
    for matrix in KR_KB:
        assert 0 <= yuv_to_rgb(BANDS, matrix).min() and yuv_to_rgb(BANDS, matrix).max() <= 255


@pytest.mark.parametrize("width,height", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_trainer_and_plugin_decode_untagged_video_with_the_same_matrix(core, tiny_bundle, tmp_path, monkeypatch,
                                                                      width, height):
    from selftransfer_trainer.video import read_frames

    path = tmp_path / f"untagged_{width}x{height}.mkv"
    make_video(path, width, height)
    (_, _, trainer), = read_frames(path, [0])
    plugin = plugin_rgb(core, path, tiny_bundle, monkeypatch)
    assert trainer.shape == plugin.shape == (height, width, 3)

    rule = colour.default_matrix(width, height)
    assert matching_matrix(trainer.astype(np.float64), width, tolerance=1) == rule
    assert matching_matrix(plugin, width, tolerance=1) == rule
    # and pixel for pixel (the band interiors: at 4:2:0 colour edges the two chroma upsamplers differ)
    interior = np.concatenate([np.arange(width)[cols] for cols in band_columns(width)])
    assert np.abs(plugin[:, interior] - trainer[:, interior]).max() <= 1


def test_the_plugin_follows_the_rule_it_is_given(core, tiny_bundle, tmp_path, monkeypatch):
    """The plugin has no rule of its own: it asks vs_selftransfer.colour when Upscale is created."""
    path = tmp_path / "untagged_640x360.mkv"
    make_video(path, 640, 360)
    assert colour.default_matrix(640, 360) == colour.MATRIX_ST170M
    monkeypatch.setattr(colour, "default_matrix", lambda width, height: colour.MATRIX_BT709)
    assert matching_matrix(plugin_rgb(core, path, tiny_bundle, monkeypatch), 640, tolerance=1) == colour.MATRIX_BT709
    monkeypatch.setattr(colour, "default_matrix", lambda width, height: 0)
    with pytest.raises(vs.Error, match=r"^selftransfer.Upscale: vs_selftransfer.colour.default_matrix\(640, 360\) "
                                       r"returned 0, not an H.273 YUV matrix code"):
        core.selftransfer.Upscale(core.bs.VideoSource(str(path), cachemode=0), model=str(tiny_bundle))
