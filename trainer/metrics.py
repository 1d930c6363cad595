"""Image quality metrics, following SR literature conventions (EDSR/CARN/RCAN evaluation code):

- images are RGB float arrays (C, H, W) in [0, 1]; SR outputs are clipped and quantized to 8 bits first
  (``quantize``), as a saved image would be;
- Y is ITU-R BT.601 luma in the studio range, as MATLAB's ``rgb2ycbcr``: Y = 16 + 65.481 R + 128.553 G + 24.966 B;
- ``scale`` pixels are shaved from every border before comparing (the border is where upsamplers guess).
"""
from __future__ import annotations

import numpy as np

Y_WEIGHTS = np.array([65.481, 128.553, 24.966], np.float64) / 255.0


def quantize(img: np.ndarray) -> np.ndarray:
    """Clip to [0, 1] and round to the 8-bit grid, as saving the output would."""
    return np.round(np.clip(img, 0.0, 1.0) * 255.0) / 255.0


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """(3, H, W) RGB in [0, 1] -> (H, W) BT.601 studio-range luma in [16/255, 235/255]."""
    img = np.asarray(img, np.float64)
    return 16.0 / 255.0 + np.tensordot(Y_WEIGHTS, img, axes=(0, 0))


def shave(img: np.ndarray, border: int) -> np.ndarray:
    if border <= 0:
        return img
    return img[..., border:-border, border:-border]


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 1.0) -> float:
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(peak * peak / mse)


def psnr_y(sr: np.ndarray, hr: np.ndarray, scale: int) -> float:
    """PSNR on the Y channel with ``scale`` pixels shaved: the number SR papers report."""
    return psnr(shave(rgb_to_y(sr), scale), shave(rgb_to_y(hr), scale))


def psnr_rgb(sr: np.ndarray, hr: np.ndarray, scale: int) -> float:
    return psnr(shave(sr, scale), shave(hr, scale))


# -- SSIM -----------------------------------------------------------------------------------------------------
# Wang, Bovik, Sheikh, Simoncelli, "Image quality assessment: from error visibility to structural similarity",
# IEEE TIP 2004, with the constants of the authors' ssim.m (and of skimage's ``gaussian_weights=True`` mode):
# an 11x11 Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03, L = 255, population (biased) variances, and the
# mean of the SSIM map over the positions where the whole window lies inside the image ('valid').
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def gaussian_window_1d(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """Normalized 1-D Gaussian; its outer product is MATLAB's fspecial('gaussian', size, sigma)."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-(x * x) / (2.0 * sigma * sigma))
    return g / g.sum()


def _filter_valid(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Separable correlation keeping only the 'valid' positions (the window entirely inside the image)."""
    import cv2

    r = (len(kernel) - 1) // 2
    # The border mode only affects the positions cropped away below.
    out = cv2.sepFilter2D(img, cv2.CV_64F, kernel, kernel, borderType=cv2.BORDER_REFLECT)
    return out[r:img.shape[0] - r, r:img.shape[1] - r]


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    """Mean SSIM of two single-channel images (H, W) given on a ``data_range`` scale (255 for 8-bit values)."""
    a = np.ascontiguousarray(a, np.float64)
    b = np.ascontiguousarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    if a.ndim != 2:
        raise ValueError(f"ssim takes single-channel (H, W) images, not shape {a.shape}")
    if min(a.shape) < SSIM_WINDOW:
        raise ValueError(f"images of {a.shape} are smaller than the {SSIM_WINDOW}x{SSIM_WINDOW} SSIM window")
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    k = gaussian_window_1d()
    mu_a, mu_b = _filter_valid(a, k), _filter_valid(b, k)
    var_a = _filter_valid(a * a, k) - mu_a * mu_a
    var_b = _filter_valid(b * b, k) - mu_b * mu_b
    cov = _filter_valid(a * b, k) - mu_a * mu_b
    num = (2.0 * mu_a * mu_b + c1) * (2.0 * cov + c2)
    den = (mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2)
    return float(np.mean(num / den))


def ssim_y(sr: np.ndarray, hr: np.ndarray, scale: int) -> float:
    """SSIM on the Y channel (0-255 scale, not rounded) with ``scale`` pixels shaved, as SR papers report it."""
    return ssim(shave(rgb_to_y(sr), scale) * 255.0, shave(rgb_to_y(hr), scale) * 255.0, 255.0)


# -- temporal flicker -----------------------------------------------------------------------------------------
def flicker(sr_prev: np.ndarray, sr: np.ndarray, hr_prev: np.ndarray, hr: np.ndarray, scale: int) -> float:
    """How much the SR output's frame-to-frame change departs from the HR video's, for two consecutive frames:

        RMSE over the shaved Y plane of  (Y(SR_t) - Y(SR_t-1)) - (Y(HR_t) - Y(HR_t-1)),  in 8-bit Y levels.

    It equals the RMSE of the change of the error image (SR - HR) between the two frames: a constant bias does
    not flicker (0), an error that comes and goes does. 0 is perfect; lower is better.
    """
    arrays = (sr_prev, sr, hr_prev, hr)
    if len({x.shape for x in arrays}) != 1:
        raise ValueError(f"flicker needs four images of one shape, not {[x.shape for x in arrays]}")
    change_sr = rgb_to_y(sr) - rgb_to_y(sr_prev)
    change_hr = rgb_to_y(hr) - rgb_to_y(hr_prev)
    d = shave(change_sr - change_hr, scale) * 255.0
    return float(np.sqrt(np.mean(d * d)))
