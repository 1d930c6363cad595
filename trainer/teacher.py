"""The teacher: HR training targets for a compressed source, made by the generic model itself.

In the source case the only frames are the source's own, and they carry its compression. Trained to reproduce
them from their degraded downscale, the network learns to reproduce the source's coding artifacts one octave up,
and that lost at the true scale in every measurement (docs/source_only.md). The teacher's target is instead what
the generic model (the weights fine-tuning starts from) makes of the frame's *clean* downscale, before any
encode: the network then learns to map a compressed input to what generic would have made of the uncompressed
one, the one thing it has to learn for this source, while generic's own upscaling is its target everywhere else.
"""
from __future__ import annotations

import numpy as np


class GenericTeacher:
    """``teacher(clean_lr)``: (h, w, 3) uint8 RGB -> (scale*h, scale*w, 3) uint8, the initial weights' output,
    clipped and rounded to 8 bits as a saved frame would be. Whole frames up to the filter's tile rule, tiled
    exactly beyond it (``vs_selftransfer.tiling``)."""

    def __init__(self, model_config, init_path: str, init_name: str, init_sha256: str | None, threads: int):
        import torch

        from selftransfer_trainer.weights import initial_model
        from vs_selftransfer.model import torch_runner

        torch.set_num_threads(threads)
        self.scale = model_config.scale
        self._model = initial_model(model_config, init_path).eval()
        self._run = torch_runner(self._model, "cpu")
        self.description = {"model": init_name, "sha256": init_sha256,
                            "what": "the initial weights' output on the frame's clean downscale"}

    def __call__(self, clean_lr: np.ndarray) -> np.ndarray:
        from vs_selftransfer.tiling import OVERLAP, auto_tile, upscale_image

        h, w = clean_lr.shape[:2]
        x = np.ascontiguousarray(np.moveaxis(clean_lr, -1, 0), np.float32) / 255.0
        y = upscale_image(self._run, x, self.scale, auto_tile(w, h), OVERLAP)
        return np.ascontiguousarray(np.moveaxis(np.round(np.clip(y, 0.0, 1.0) * 255.0), 0, -1).astype(np.uint8))
