"""Checking a runnable graph (ONNX, TorchScript, a TensorRT engine) against the PyTorch model it was made from.

Export runs every graph it writes through ``check_graph`` (a graph that does not reproduce the weights never
ships), and the TensorRT backend runs every engine it builds through it before using or caching it.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

# Check inputs: one odd non-square size (catches padding/stride mistakes) and one square size with a batch of 2
# (the ONNX graph and TorchScript module claim a dynamic batch).
CHECK_SHAPES = ((1, 3, 37, 53), (2, 3, 64, 64))


class GraphCheckError(RuntimeError):
    """A graph does not load, does not run, or does not reproduce the model."""


def check_image(shape: tuple[int, ...], seed: int = 0):
    """A deterministic image-like input in [0, 1] (a torch tensor): smooth gradients, edges and a little noise (real
    content has all three; pure noise alone would exercise only one regime of the network)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    base = torch.stack([xx, yy, (xx + yy) / 2])[:c]
    edges = ((torch.sin(xx * 23) * torch.cos(yy * 17)) > 0).float()
    img = 0.6 * base + 0.3 * edges + 0.1 * torch.rand(n, c, h, w, generator=g)
    return img.clamp(0, 1).contiguous()


def check_graph(name: str, make_runner: Callable[[], Callable], reference: Callable[[np.ndarray], np.ndarray],
                tolerance: float, shapes=CHECK_SHAPES) -> float:
    """Run the graph (``make_runner()`` loads it and returns its ``run``) on ``check_image`` inputs of ``shapes``
    against ``reference`` (the eager model's run, ``vs_selftransfer.model.torch_runner``). Returns the max absolute
    difference; raises GraphCheckError when the graph does not load, does not run, returns the wrong shape or
    differs by more than ``tolerance``."""
    try:
        run = make_runner()
    except Exception as e:  # noqa: BLE001 - a graph that does not load is a failed check, said as such
        raise GraphCheckError(f"{name} does not load: {e}") from e
    worst = 0.0
    for i, shape in enumerate(shapes):
        x = check_image(shape, seed=i).numpy()
        expected = reference(x)
        try:
            got = np.asarray(run(x), dtype=np.float32)
        except Exception as e:  # noqa: BLE001 - a graph that does not run is a failed check, said as such
            raise GraphCheckError(f"{name} does not run on a {shape} input: {e}") from e
        if got.shape != expected.shape:
            raise GraphCheckError(f"{name} returned shape {got.shape} for input {shape}, expected {expected.shape}")
        diff = float(np.abs(got - expected).max()) if np.isfinite(got).all() else float("inf")
        if not diff <= tolerance:
            raise GraphCheckError(f"{name} differs from the PyTorch model by {diff:.3g} (> {tolerance:g}) on a "
                                  f"{shape[2]}x{shape[3]} input")
        worst = max(worst, diff)
    return worst
