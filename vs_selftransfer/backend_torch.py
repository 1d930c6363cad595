"""PyTorch backend (``torch``): the bundle's frozen TorchScript module on CPU or CUDA.

TorchScript carries code: this backend is only used when the user picks it (``backend="torch"``), never by
default. A bundle without ``model.ts`` still runs here: the network is then built from ``weights.safetensors``
(data only) with this package's own model code.
Precision: fp32; fp16 (CUDA, autocast); bf16 (autocast, on CPU worthwhile only with native bf16 units).
``threads`` > 0 sets PyTorch's intra-op thread count, which is process-wide.
"""
from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np

from vs_selftransfer.backend_base import check_args, check_input, parse_device

DEVICES = ("cpu", "cuda")


def available(device: str = "cpu") -> str | None:
    """None when this backend can run on ``device``, else the reason and what to install."""
    try:
        kind, index = parse_device(device)
    except ValueError as e:
        return str(e)
    try:
        import torch
    except ImportError:
        return "PyTorch is not installed (pip install torch)"
    if kind == "cpu":
        return None
    if kind == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA device is available to PyTorch (torch.cuda.is_available() is False)"
        if index >= torch.cuda.device_count():
            return f"there is no CUDA device {index} (PyTorch sees {torch.cuda.device_count()})"
        return None
    return f"the torch backend runs on cpu or cuda, not {device!r}"


class Backend:
    name = "torch"

    def __init__(self, bundle, *, device: str = "cpu", precision: str = "fp32", threads: int = 0,
                 window: tuple[int, int] | None = None, run_code: bool = True):
        """``run_code=False``: build the network from the safetensors weights even when the bundle has a
        TorchScript member (which carries code; the runtime opens it only when the user picked this backend)."""
        kind, index, self.window = check_args(self.name, bundle, device, precision, threads, window, devices=DEVICES)
        if precision == "int8":
            raise ValueError("the torch backend runs fp32, fp16 (cuda) or bf16, not int8: int8 runs on ort or ov")
        if precision == "fp16" and kind == "cpu":
            raise ValueError("precision fp16 is for CUDA devices in the torch backend (PyTorch's CPU fp16 is slower "
                             "than fp32): use fp32, or bf16 on a CPU with native bf16")
        if (reason := available(device)) is not None:
            raise RuntimeError(f"the torch backend cannot run on {device!r}: {reason}")
        import torch

        self._torch = torch
        self.torch_device = torch.device("cpu") if kind == "cpu" else torch.device("cuda", index)
        if threads:
            torch.set_num_threads(threads)
        if bundle.has("model.ts") and run_code:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
                    self.module = torch.jit.load(io.BytesIO(bundle.member("model.ts")), map_location=self.torch_device)
            except Exception as e:  # noqa: BLE001 - torch.jit raises RuntimeError for anything
                raise RuntimeError(f"{bundle.path}: PyTorch cannot load model.ts: {e}") from None
            self.source = "model.ts"
        else:
            self.module = bundle.torch_model().to(self.torch_device)
            self.source = "weights.safetensors"
        self.module.eval()
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
        self._autocast = (lambda: torch.autocast(self.torch_device.type, dtype=dtype)) if dtype else contextlib.nullcontext
        self.scale = bundle.scale
        self.precision = precision
        self.device = device
        self.description = f"torch {self.torch_device} {precision} ({self.source})"

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = check_input(self.name, x, self.window)
        torch = self._torch
        try:
            with torch.inference_mode(), self._autocast():
                y = self.module(torch.from_numpy(x).to(self.torch_device))
            # On CPU in fp32 this is the module's own output buffer (no copy); otherwise one conversion/transfer.
            return y.to("cpu", torch.float32).numpy()
        except Exception as e:  # noqa: BLE001
            raise RuntimeError(f"torch backend: inference failed on input {x.shape}: {e}") from None
