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
