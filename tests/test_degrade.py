"""trainer/degrade.py: MATLAB-compatible imresize, the seed's cv2 cubic, and the x264 degradation."""
import math

import numpy as np
import pytest

from selftransfer_trainer.degrade import DEGRADATIONS, contributions, crop_to_scale, degrade, imresize, x264_roundtrip
from selftransfer_trainer.metrics import psnr
from selftransfer_trainer.video import read_frames

# MATLAB: imresize's weights for a x2 bicubic shrink (Keys a=-0.5 kernel stretched x2, normalised), the same for
# every output pixel: 0.5*cubic(0.5*d) at distances d = +-0.5, +-1.5, +-2.5, +-3.5.
MATLAB_X2_WEIGHTS = [-0.01171875, -0.03515625, 0.11328125, 0.43359375, 0.43359375, 0.11328125, -0.03515625,
                     -0.01171875]


def reference_imresize(img, scale):
    """A direct, per-pixel transcription of MATLAB's imresize.m (bicubic, antialiasing on), written independently
    of trainer.degrade: loops, no vectorisation, no shortcuts. uint8 in -> rounded uint8 after each pass."""
    def cubic(x):
        x = abs(x)
        if x <= 1:
            return 1.5 * x ** 3 - 2.5 * x ** 2 + 1
        if x <= 2:
            return -0.5 * x ** 3 + 2.5 * x ** 2 - 4 * x + 2
        return 0.0

    def resize_rows(a):
        n = a.shape[0]
        out_len = math.ceil(n * scale - 1e-9)
        width = 4 / scale if scale < 1 else 4
        out = np.zeros((out_len,) + a.shape[1:])
        for i in range(out_len):
            u = (i + 1) / scale + 0.5 * (1 - 1 / scale)
            left = math.floor(u - width / 2)
            terms = []
            for k in range(math.ceil(width) + 2):
                j = left + k  # 1-based, may be outside 1..n
                w = scale * cubic(scale * (u - j)) if scale < 1 else cubic(u - j)
                m = (j - 1) % (2 * n)  # mirror: 1..n, n..1, ...
                terms.append((w, m if m < n else 2 * n - 1 - m))
            total = sum(w for w, _ in terms)
            for w, j in terms:
                out[i] += (w / total) * a[j].astype(np.float64)
        if img.dtype == np.uint8:
            out = np.clip(np.floor(out + 0.5), 0, 255).astype(np.uint8)
        return out

    rows = resize_rows(img)
    return np.swapaxes(resize_rows(np.swapaxes(rows, 0, 1)), 0, 1)


@pytest.fixture(scope="module")
def frame(clip_path):
    return next(read_frames(clip_path, [0]))[2]


def test_matlab_x2_weights_and_symmetric_border():
    weights, ind = contributions(8, 4, 0.5)
    for row in weights:
        assert row.tolist() == pytest.approx(MATLAB_X2_WEIGHTS, abs=1e-15)
    # Output pixel 0 reaches 3 pixels past the top edge: MATLAB mirrors them with the edge pixel repeated.
    assert ind[0].tolist() == [2, 1, 0, 0, 1, 2, 3, 4]
    assert ind[3].tolist() == [3, 4, 5, 6, 7, 7, 6, 5]


@pytest.mark.parametrize("scale", [1 / 2, 1 / 3, 1 / 4, 0.6, 2.0])
@pytest.mark.parametrize("shape", [(23, 31, 3), (9, 12), (40, 37, 1)])
def test_imresize_matches_reference(scale, shape):
    rng = np.random.default_rng(len(shape) * 100 + int(scale * 10))
    img8 = rng.integers(0, 256, shape, dtype=np.uint8)
    got = imresize(img8, scale)
    want = reference_imresize(img8, scale)
    assert got.dtype == np.uint8 and got.shape == want.shape
    assert np.array_equal(got, want)
    imgf = rng.random(shape)
    assert np.allclose(imresize(imgf, scale), reference_imresize(imgf, scale), rtol=0, atol=1e-12)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_constant_image_stays_constant(scale):
    img = np.full((48, 60, 3), 173, np.uint8)
    assert (imresize(img, 1 / scale) == 173).all()
    assert np.allclose(imresize(img / 255.0, 1 / scale), 173 / 255.0, atol=1e-12)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_linear_ramp_is_exact_in_the_interior(scale):
    # The cubic kernel reproduces linear functions: away from the borders, output pixel i is the ramp's value at
    # its centre, scale*i + (scale-1)/2 in input coordinates.
    h, w = 24 * scale, 30 * scale
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    ramp = 0.3 + 0.002 * x + 0.005 * y
    out = imresize(ramp, 1 / scale)
    oy, ox = np.mgrid[0:24, 0:30].astype(np.float64)
    want = 0.3 + 0.002 * (scale * ox + (scale - 1) / 2) + 0.005 * (scale * oy + (scale - 1) / 2)
    m = 3  # the kernel reaches 2 LR pixels (4*scale/2 input pixels) past a pixel's centre
    assert np.allclose(out[m:-m, m:-m], want[m:-m, m:-m], rtol=0, atol=1e-12)
    assert not np.allclose(out[0], want[0], atol=1e-6)  # the symmetric border does bend the ramp


def test_uint8_rounds_halves_away_from_zero():
    # 0 and 1 alternating columns shrink x2 to exactly 0.5 per pixel in the interior: MATLAB gives 1, not 0.
    img = np.tile(np.array([0, 1], np.uint8), (16, 16))
    assert imresize(img.astype(np.float64), 0.5)[4:-4, 4:-4] == pytest.approx(0.5)
    assert (imresize(img, 0.5)[4:-4, 4:-4] == 1).all()


def test_antialiasing_suppresses_aliasing_that_cv2_cubic_keeps():
    # Vertical stripes at 0.4 cycles/pixel: above the x2 output's Nyquist limit (0.25), so an ideal shrink
    # leaves a flat gray; whatever pattern remains is aliasing.
    x = np.arange(256)
    stripes = np.repeat((128 + 100 * np.sin(2 * np.pi * 0.4 * x))[None, :], 64, 0)
    img = np.repeat(stripes[..., None], 3, axis=2).round().astype(np.uint8)
    alias = {m: degrade(img, 2, m)[8:-8, 8:-8].astype(np.float64).std() for m in ("bicubic", "cv2_cubic")}
    assert alias["bicubic"] < 0.2 * alias["cv2_cubic"], alias


def test_degrade_crops_to_the_scale(frame):
    odd = frame[:719, :1279]
    for method in DEGRADATIONS:
        lr = degrade(odd, 2, method)
        assert lr.shape == (359, 639, 3) and lr.dtype == np.uint8
    assert crop_to_scale(odd, 2).shape == (718, 1278, 3)
    assert np.array_equal(degrade(odd, 2, "bicubic"), imresize(crop_to_scale(odd, 2), 0.5))
    assert degrade(frame, 3).shape == (240, 426, 3) and degrade(frame, 4).shape == (180, 320, 3)


def test_cv2_cubic_is_the_seeds_resize(frame):
    import cv2

    want = cv2.resize(frame, (640, 360), interpolation=cv2.INTER_CUBIC)
    assert np.array_equal(degrade(frame, 2, "cv2_cubic"), want)
    assert not np.array_equal(want, degrade(frame, 2, "bicubic"))


def test_x264_compresses_but_stays_close(frame):
    hr = frame[:362, :642]  # LR 181x321: odd sides, padded for yuv420p and cut back
    clean = degrade(hr, 2, "bicubic")
    coded = degrade(hr, 2, "x264", crf=23)
    assert coded.shape == clean.shape == (181, 321, 3)
    assert not np.array_equal(coded, clean)
    assert psnr(coded / 255.0, clean / 255.0) > 30
    # Lower CRF = higher quality; and the encoder is deterministic.
    assert psnr(degrade(hr, 2, "x264", crf=10) / 255.0, clean / 255.0) > psnr(coded / 255.0, clean / 255.0)
    assert np.array_equal(degrade(hr, 2, "x264", crf=23), coded)


def test_x264_round_trip_adds_no_level_bias(clip_path):
    """The codec degrades detail, not brightness: on real frames the coded frames' mean stays within half a level
    of the clean ones per channel (the swscale default path made them 0.7 to 1.5 levels darker, and a model
    fine-tuned on such inputs learned to brighten the real source's frames by a level)."""
    from selftransfer_trainer.degrade import imresize, x264_video_roundtrip

    clean = [imresize(rgb, 0.5) for _, _, rgb in read_frames(clip_path, range(40, 48))]
    for coded in (x264_video_roundtrip(clean, 23), [x264_roundtrip(c, 23) for c in clean[:2]]):
        bias = np.mean([c.astype(np.float64).mean(axis=(0, 1)) - k.mean(axis=(0, 1))
                        for c, k in zip(coded, clean)], axis=0)
        assert np.all(np.abs(bias) < 0.5), bias


def test_x264_video_codes_frames_from_their_neighbours(clip_path):
    """A run coded as a video: an I-frame first, then predicted frames at higher quantisers (as a source's own
    P/B-frames are); one frame alone is exactly ``degrade(..., "x264")``'s lone-frame encode. Two runs agree to
    within encoder noise (x264's macroblock-tree rate control is not bit-exact between runs at some frame sizes)."""
    from selftransfer_trainer.degrade import imresize, x264_video_roundtrip

    clean = [imresize(rgb, 0.5)[:179, :319] for _, _, rgb in read_frames(clip_path, range(40, 56))]
    coded, qp = x264_video_roundtrip(clean, 23, with_qp=True)
    assert len(coded) == 16 and all(c.shape == (179, 319, 3) for c in coded)
    assert np.mean(qp[1:]) > qp[0] + 2  # predicted frames are quantised more coarsely than the keyframe
    assert all(psnr(c / 255.0, k / 255.0) > 28 for c, k in zip(coded, clean))
    again = x264_video_roundtrip(clean, 23)
    assert all(abs(psnr(a / 255.0, k / 255.0) - psnr(b / 255.0, k / 255.0)) < 0.3
               for a, b, k in zip(again, coded, clean))
    assert np.array_equal(x264_video_roundtrip(clean[:1], 23)[0], x264_roundtrip(clean[0], 23))


def test_bad_arguments_are_refused(frame):
    with pytest.raises(ValueError, match="unknown degradation"):
        degrade(frame, 2, "lanczos")
    with pytest.raises(ValueError, match="crf"):
        degrade(frame, 2, "x264", crf=60)
    with pytest.raises(ValueError, match="scale"):
        degrade(frame, 0)
    with pytest.raises(ValueError, match="uint8"):
        degrade(frame.astype(np.float32), 2)
    with pytest.raises(ValueError, match="scale"):
        imresize(frame, -1.0)
