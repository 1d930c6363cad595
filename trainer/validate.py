"""Validation during training: how well a model upscales the held-out frames of the pairs file.

The score is the mean Y-PSNR (``selftransfer_trainer.metrics.psnr_y``: BT.601 studio Y, border shaved by the scale,
8-bit quantized outputs) over the validation frames, each upscaled whole or in exact tiles (the automatic tile rule
and overlap of ``vs_selftransfer.tiling``, the ones the filter uses) in fp32, as the exported model runs whatever
precision the training steps use. The baseline the run reports beside it is bicubic upsampling (MATLAB
``imresize`` bicubic, ``selftransfer_trainer.degrade.imresize``, the SR literature's baseline).

On the CPU the frames can run through ONNX Runtime (``OnnxRunner``): about twice as fast as eager PyTorch there
for whole frames, but its graph costs seconds to export once, so ``backend="auto"`` uses it only when the
validation frames are large enough for that to pay back (``ORT_MIN_PIXELS``).
"""
from __future__ import annotations

import copy
import sys

import numpy as np
import torch

from vs_selftransfer.errors import UserError
from vs_selftransfer.model import torch_runner
from vs_selftransfer.tiling import auto_tile, upscale_image
from selftransfer_trainer.metrics import psnr_y, quantize

BACKENDS = ("auto", "ort", "torch")
ORT_MIN_PIXELS = 2 * 640 * 360  # LR pixels over all validation frames from which "auto" validates with ORT
# An ONNX Runtime session must reproduce the PyTorch model to this max absolute difference, or PyTorch validates.
ORT_TOLERANCE = 1e-4


def to_chw_float(img_hwc_uint8: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(img_hwc_uint8.transpose(2, 0, 1), dtype=np.float32) / np.float32(255.0)


class OnnxRunner:
    """Validation upscaling through ONNX Runtime, about twice as fast as eager PyTorch on the CPU for whole frames.

    The graph is exported once (``selftransfer_trainer.export.onnx_bytes``, the exporter the bundle uses: seconds);
    each validation writes the current weights into the graph's initializers (same names as the state dict) and
    opens a session (tens of ms) with the runtime's session options (``vs_selftransfer.backend_ort.make_session``).
    Injecting weights with ``SessionOptions.add_initializer`` instead is not reliable: with every graph optimization
    on, ONNX Runtime pre-packs convolution weights before the override applies. Each session is checked against the
    PyTorch model on a small input, so a validation score is the PyTorch model's.
    """

    def __init__(self, model: torch.nn.Module, threads: int):
        import onnx

        from selftransfer_trainer.export import onnx_bytes

        cpu_model = copy.deepcopy(model).float().cpu().to(memory_format=torch.contiguous_format).eval()
        self.proto = onnx.load_from_string(onnx_bytes(cpu_model))
        self.threads = threads

    def __call__(self, model: torch.nn.Module):
        """A ``run`` callable for the tiling function with ``model``'s current weights (``model`` in eval mode), or
        None if the session does not reproduce the model (then the caller uses PyTorch)."""
        from onnx import numpy_helper

        from vs_selftransfer.backend_ort import make_session, session_runner

        state = model.state_dict()
        for init in self.proto.graph.initializer:
            if init.name not in state:
                return None
            init.CopyFrom(numpy_helper.from_array(state[init.name].detach().float().cpu().numpy(), init.name))
        run = session_runner(make_session(self.proto.SerializeToString(), threads=self.threads))
        check = np.random.default_rng(0).random((1, 3, 24, 32), dtype=np.float32)
        reference = torch_runner(model, next(model.parameters()).device, channels_last=False)(check)
        if float(np.max(np.abs(run(check) - reference))) > ORT_TOLERANCE:
            return None
        return run


class Validator:
    """Scores models on the validation frames (``(lr, hr)`` RGB uint8 HWC pairs): ``validator(model)`` is the mean
    Y-PSNR of ``model``'s upscaling, ``validator.bicubic()`` the bicubic baseline's.

    ``tile``: LR tile side, 0 for the automatic rule; ``overlap``: LR px of context per tile. ``backend``: "torch"
    (eager, on ``device``), "ort" (ONNX Runtime, CPU only) or "auto" (ORT on the CPU for large validation sets).
    ``model`` is the network to be trained, needed once to export the ORT graph.
    """

    def __init__(self, frames, scale: int, model: torch.nn.Module, device: torch.device, *, backend: str = "auto",
                 threads: int = 1, channels_last: bool = True, tile: int = 0, overlap: int = 0):
        if backend not in BACKENDS:
            raise ValueError(f"validation backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
        self.frames_uint8 = list(frames)
        self.frames = [(to_chw_float(lr), to_chw_float(hr)) for lr, hr in self.frames_uint8]
        self.scale, self.device, self.channels_last = scale, device, channels_last
        self.tile, self.overlap = tile, overlap
        pixels = sum(lr.shape[1] * lr.shape[2] for lr, _ in self.frames)
        self.onnx = None
        if device.type == "cpu" and (backend == "ort" or (backend == "auto" and pixels >= ORT_MIN_PIXELS)):
            try:
                import onnx  # noqa: F401
                import onnxruntime  # noqa: F401
            except ImportError:
                if backend == "ort":
                    raise UserError("validation through ONNX Runtime needs the onnx and onnxruntime packages "
                                    "(pip install onnx onnxruntime)") from None
            else:
                self.onnx = OnnxRunner(model, threads)

    def __call__(self, model: torch.nn.Module) -> float:
        """Mean Y-PSNR of ``model`` over the validation frames, in fp32, in eval mode (its mode is restored)."""
        was_training = model.training
        model.eval()
        run = self.onnx(model) if self.onnx is not None else None
        if run is None:
            if self.onnx is not None:
                print("selftransfer train: warning: the ONNX Runtime session does not reproduce the model; "
                      "validating with PyTorch", file=sys.stderr)
            run = torch_runner(model, self.device, channels_last=self.channels_last)
        scores = []
        for lr, hr in self.frames:
            h, w = lr.shape[1:]
            sr = upscale_image(run, lr, self.scale, self.tile or auto_tile(w, h), self.overlap)
            scores.append(psnr_y(quantize(sr), hr, self.scale))
        model.train(was_training)
        return float(np.mean(scores))

    def bicubic(self) -> float:
        """Mean Y-PSNR of bicubic upsampling (uint8 in, uint8 out, MATLAB rounding) over the validation frames."""
        from selftransfer_trainer.degrade import imresize

        scores = []
        for lr, hr in self.frames_uint8:
            up = imresize(lr, float(self.scale))
            scores.append(psnr_y(to_chw_float(up), to_chw_float(hr), self.scale))
        return float(np.mean(scores))
