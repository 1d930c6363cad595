"""Metrics against known values: identical images, constant shifts (closed forms), a hand-computed PSNR, and
SSIM against a direct, slow transcription of Wang et al. 2004 (one window position at a time)."""
import math

import numpy as np
import pytest

from selftransfer_trainer.metrics import (flicker, gaussian_window_1d, psnr, psnr_rgb, psnr_y, quantize, rgb_to_y, shave, ssim, ssim_y)


def _random_rgb(rng, h, w):
    return quantize(rng.random((3, h, w)))


def test_identical_images():
    rng = np.random.default_rng(1)
    img = _random_rgb(rng, 32, 40)
    assert psnr_y(img, img, 2) == math.inf
    assert psnr_rgb(img, img, 2) == math.inf
    assert ssim_y(img, img, 2) == pytest.approx(1.0, abs=1e-12)


def test_constant_shift_psnr_is_closed_form():
    rng = np.random.default_rng(2)
    hr = 0.2 + 0.6 * rng.random((3, 24, 24))  # shifted values stay inside [0, 1]
    delta = 3.0 / 255.0
    sr = hr + delta
    assert psnr_rgb(sr, hr, 2) == pytest.approx(20 * math.log10(1 / delta), abs=1e-9)
    # The same shift on R, G and B moves Y by delta * (65.481 + 128.553 + 24.966) / 255 = delta * 219 / 255.
    assert psnr_y(sr, hr, 2) == pytest.approx(20 * math.log10(1 / (delta * 219 / 255)), abs=1e-9)


def test_psnr_y_hand_computed_tiny_example():
    # 1x2 RGB image, no shave. HR pixels: black and white. SR: R of the first pixel is 51/255 instead of 0.
    hr = np.zeros((3, 1, 2))
    hr[:, 0, 1] = 1.0
    sr = hr.copy()
    sr[0, 0, 0] = 51 / 255
    # Y difference at pixel 0: 65.481/255 * 51/255 = 0.05135765...; pixel 1: 0.
    dy = 65.481 / 255 * 51 / 255
    mse = dy * dy / 2
    assert psnr_y(sr, hr, 0) == pytest.approx(10 * math.log10(1 / mse), abs=1e-9)
    # Y of pure white and black in the studio range: 235 and 16.
    assert rgb_to_y(hr)[0, 1] * 255 == pytest.approx(235.0)
    assert rgb_to_y(hr)[0, 0] * 255 == pytest.approx(16.0)


def test_psnr_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(np.zeros((3, 4, 4)), np.zeros((3, 4, 5)))


def test_quantize_and_shave():
    x = np.array([[-0.2, 0.5 / 255, 1.49 / 255, 1.7]])
    assert np.array_equal(quantize(x) * 255, [[0, 0, 1, 255]])  # round half to even at 0.5, like np.round
    assert shave(np.arange(36).reshape(6, 6), 2).tolist() == [[14, 15], [20, 21]]


def test_gaussian_window_is_fspecial():
    g = gaussian_window_1d()
    assert g.shape == (11,) and g.sum() == pytest.approx(1.0)
    w2 = np.outer(g, g)
    x = np.arange(11) - 5
    expected = np.exp(-(x[:, None] ** 2 + x[None, :] ** 2) / (2 * 1.5 ** 2))
    assert np.allclose(w2, expected / expected.sum(), atol=1e-15)


def test_ssim_of_a_constant_shift_is_its_luminance_term():
    # Flat images: sigma_x = sigma_y = sigma_xy = 0, so the contrast-structure term is C2 / C2 = 1 and
    # SSIM = (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1) with C1 = (0.01 * 255)^2 = 6.5025.
    a = np.full((20, 20), 100.0)
    b = a + 10.0
    c1 = 6.5025
    expected = (2 * 100 * 110 + c1) / (100 ** 2 + 110 ** 2 + c1)
    assert expected == pytest.approx(0.9954764, abs=1e-7)  # worked by hand: 22006.5025 / 22106.5025
    assert ssim(a, b) == pytest.approx(expected, abs=1e-12)


def test_ssim_y_of_a_flat_rgb_shift():
    # Flat grey RGB g -> Y = 16 + 219 g (8-bit levels); a shift of the RGB by d shifts Y by 219 d.
    a = np.full((3, 30, 30), 0.4)
    b = np.full((3, 30, 30), 0.5)
    ya, yb = 16 + 219 * 0.4, 16 + 219 * 0.5
    c1 = (0.01 * 255) ** 2
    assert ssim_y(b, a, 2) == pytest.approx((2 * ya * yb + c1) / (ya ** 2 + yb ** 2 + c1), abs=1e-12)


def _ssim_reference(x, y, L=255.0):
    """Wang et al. 2004, eqs. (14)-(16) with the Gaussian-weighted statistics of Sec. III-C, window by window."""
    w = np.outer(gaussian_window_1d(11, 1.5), gaussian_window_1d(11, 1.5))
    c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    values = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            px, py = x[i:i + 11, j:j + 11], y[i:i + 11, j:j + 11]
            mx, my = np.sum(w * px), np.sum(w * py)
            vx = np.sum(w * (px - mx) ** 2)
            vy = np.sum(w * (py - my) ** 2)
            cxy = np.sum(w * (px - mx) * (py - my))
            values.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


@pytest.mark.parametrize("seed", [0, 1])
def test_ssim_matches_direct_formula(seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (23, 29)).astype(np.float64)
    y = np.clip(x + rng.normal(0, 80, x.shape), 0, 255)  # correlated, so the structure term matters
    expected = _ssim_reference(x, y)
    assert 0.2 < expected < 0.95
    assert ssim(x, y) == pytest.approx(expected, abs=1e-10)
    assert ssim(y, x) == pytest.approx(expected, abs=1e-10)  # symmetric


def test_ssim_errors():
    with pytest.raises(ValueError, match="smaller than"):
        ssim(np.zeros((8, 20)), np.zeros((8, 20)))
    with pytest.raises(ValueError, match="shapes differ"):
        ssim(np.zeros((20, 20)), np.zeros((20, 21)))


def test_flicker_zero_when_sr_is_hr_or_a_constant_bias():
    rng = np.random.default_rng(3)
    hr0, hr1 = 0.1 + 0.8 * rng.random((2, 3, 16, 16))
    assert flicker(hr0, hr1, hr0, hr1, 2) == 0.0
    # A bias that stays put is an error, not a flicker.
    assert flicker(hr0 + 0.05, hr1 + 0.05, hr0, hr1, 2) == pytest.approx(0.0, abs=1e-12)


def test_flicker_known_value():
    rng = np.random.default_rng(4)
    hr0, hr1 = 0.1 + 0.8 * rng.random((2, 3, 16, 16))
    d = 4 / 255
    # The SR output jumps by d on every channel between the frames where the HR does not: Y moves 219/255 * 4 levels.
    assert flicker(hr0, hr1 + d, hr0, hr1, 2) == pytest.approx(4 * 219 / 255, abs=1e-9)
    # An error of +e/-e in a checkerboard that flips sign between frames: the change of the error is 2e everywhere.
    e = 2 / 255
    checker = np.where((np.add.outer(np.arange(16), np.arange(16)) % 2) == 0, e, -e)[None].repeat(3, 0)
    assert flicker(hr0 + checker, hr1 - checker, hr0, hr1, 2) == pytest.approx(2 * 2 * 219 / 255, abs=1e-9)
    # Only the shaved interior counts: a change confined to the border is ignored.
    border = np.zeros((3, 16, 16))
    border[:, :2, :] = 0.5
    assert flicker(hr0, hr1 + border, hr0, hr1, 2) == 0.0


def test_flicker_rejects_mismatched_shapes():
    a = np.zeros((3, 8, 8))
    with pytest.raises(ValueError, match="one shape"):
        flicker(a, a, a, np.zeros((3, 8, 9)), 2)
