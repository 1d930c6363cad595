"""VMAF per frame (Netflix's vmaf_v0.6.1 model), the metric encoders judge by, through the ``vmaf-torch`` package.

``vmaf-torch`` is a PyTorch re-implementation of libvmaf's features (ADM, VIF, motion) with the vmaf_v0.6.1 SVM
embedded; its authors report a mean |difference| of 0.006 VMAF points against libvmaf on the Netflix public set.
It is not libvmaf itself. It runs offline (no model file is read).

Input convention. libvmaf scores the Y plane of 8-bit YUV video exactly as stored: integers, no range conversion,
and the 8-bit video its models were trained on is limited ("studio") range, Y in 16..235. So the Y given here is
the BT.601 studio-range luma that the other metrics use (``metrics.rgb_to_y``), on the 0..255 scale and rounded
to integers, i.e. the Y plane an 8-bit limited-range YUV file of the same frame would carry. The whole frame is
scored, at the reference's resolution (VMAF crops no border).

Motion. vmaf_v0.6.1's motion2 feature belongs to the *reference* video: for frame i it is the smaller of the mean
absolute differences of the blurred reference frame i to frames i-1 and i+1 (0 for the first frame, the one to
i-1 for the last). The caller passes the true neighbouring reference frames, so frames sampled from a video score
as they would in a full libvmaf run; ADM and VIF depend on (reference i, distorted i) only.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np

from selftransfer_trainer.metrics import rgb_to_y

PACKAGE = "vmaf-torch"
MODULE = "vmaf_torch"
MODEL = "vmaf_v0.6.1"
# Plenty for the 4 methods of a frame; more workers than methods would idle.
MAX_WORKERS = 4


def package_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(PACKAGE)
    except PackageNotFoundError:
        return None


def unavailable() -> str | None:
    """None when VMAF can be computed here, else why not (for an error message that names the package)."""
    try:
        import vmaf_torch  # noqa: F401 - the import is the check
    except Exception as e:  # noqa: BLE001 - a broken install fails in many ways (missing pandas, a bad wheel)
        return f"the Python package {PACKAGE} does not import here ({type(e).__name__}: {e})"
    return None


def check_available() -> None:
    """Raise the one error that says VMAF cannot be computed here, naming the package and the way around it."""
    from vs_selftransfer.errors import UserError

    reason = unavailable()
    if reason:
        raise UserError(f"VMAF needs {reason}: install it (pip install {PACKAGE}), or pass --no-vmaf to evaluate "
                        "without VMAF")


def luma(img: np.ndarray) -> np.ndarray:
    """(3, H, W) RGB in [0, 1] -> (H, W) float32 Y on libvmaf's 8-bit input scale (see the module docstring)."""
    return np.round(rgb_to_y(img) * 255.0).astype(np.float32)


def luma_u8(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> the same Y as ``luma``."""
    return luma(np.moveaxis(np.asarray(rgb), -1, 0).astype(np.float64) / 255.0)


@dataclass(frozen=True)
class Info:
    package: str
    version: str | None
    model: str

    def to_json(self) -> dict:
        return {"package": self.package, "version": self.version, "model": self.model}


class VmafScorer:
    """Scores distorted Y planes against a reference Y plane with vmaf_v0.6.1.

    On the CPU every frame is scored with one PyTorch thread, the methods of a frame in parallel on up to
    ``workers`` threads: libvmaf's features are many small filter passes, and splitting each of them across
    threads costs more than it gains as soon as another process shares the cores (measured on the 2-core machine
    under load: 6 s per 1280x720 frame with 2 threads per pass, 0.33 s with one)."""

    def __init__(self, device: str = "cpu", workers: int = 1):
        import torch
        from vmaf_torch import VMAF

        self.device = torch.device(device)
        # clip_score: libvmaf clips vmaf_v0.6.1's prediction to the model's score range [0, 100] by default.
        self._vmaf = VMAF(temporal_pooling=False, enable_motion=True, clip_score=True, NEG=False)
        self._vmaf = self._vmaf.to(self.device).eval()
        self.workers = max(1, min(workers, MAX_WORKERS)) if self.device.type == "cpu" else 1
        self._pool = None
        if self.workers > 1:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="vmaf")
        self.info = Info(PACKAGE, package_version(), MODEL)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _tensor(self, y: np.ndarray):
        import torch

        y = np.asarray(y, np.float32)
        if y.ndim != 2:
            raise ValueError(f"VMAF takes (H, W) Y planes, not shape {y.shape}")
        return torch.from_numpy(np.ascontiguousarray(y)).to(self.device)[None, None]

    @contextlib.contextmanager
    def _one_thread(self):
        """One PyTorch thread while scoring (see the class docstring); the caller's setting is restored after.
        The setting is process-wide, so it is made once here, not in each worker."""
        import torch

        threads = torch.get_num_threads()
        if self.device.type == "cpu":
            torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)

    def motion2(self, previous: np.ndarray | None, current: np.ndarray, following: np.ndarray | None) -> float:
        """vmaf_v0.6.1's motion2 of reference frame ``current`` from its neighbours (None: there is none, i.e.
        ``current`` is the video's first or last frame)."""
        import torch

        frames = [y for y in (previous, current, following) if y is not None]
        shapes = {np.shape(y) for y in frames}
        if len(shapes) != 1:
            raise ValueError(f"motion2 needs frames of one shape, not {sorted(shapes)}")
        with self._one_thread(), torch.inference_mode():
            stack = torch.cat([self._tensor(y) for y in frames])
            # The package's motion2 of a run of frames; the run's first frame is the video's first here only when
            # there is no previous frame, which is the one case where its value (0) is the right one.
            return float(self._vmaf.compute_motion2(stack)[0 if previous is None else 1, 0])

    def scores(self, reference: np.ndarray, distorted: list[np.ndarray], motion2: float) -> list[float]:
        """VMAF of each distorted Y plane against ``reference`` (one frame), given the reference's motion2."""
        import torch

        for d in distorted:
            if np.shape(d) != np.shape(reference):
                raise ValueError(f"VMAF needs frames of one shape, not {np.shape(reference)} and {np.shape(d)}")
        ref = self._tensor(reference)
        motion = torch.tensor([[motion2]], dtype=torch.float32, device=self.device)

        def one(d):
            with torch.inference_mode():  # per thread: inference mode is thread-local
                dist = self._tensor(d)
                adm = self._vmaf.compute_adm_score(ref, dist)
                vif = self._vmaf.compute_vif_features(ref, dist)
                return float(self._vmaf.predict(adm, motion, vif)[0, 0])

        with self._one_thread():
            return [one(d) for d in distorted] if self._pool is None else list(self._pool.map(one, distorted))
