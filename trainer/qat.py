"""Quantization-aware fine-tuning: the per-video int8 graph trained through the rounding it will run with.

Post-training quantization (trainer/quantize.py) rounds weights and activations that were never trained to be
rounded; on fine-tuned bundles that costs more than the 0.05 dB budget. Here the network is fine-tuned a few more
steps on the video's own HR/LR pairs with fake quantization in the forward pass (straight-through estimator in
the backward pass), so the weights settle where their int8 rounding costs least, and the result is exported as a
QDQ ONNX graph (QuantizeLinear/DequantizeLinear pairs) that OpenVINO compiles to int8 kernels.

The scheme is the PTQ recipe's, so OpenVINO's low-precision transformations treat both graphs alike:

* weights of every conv outside ``quantize.FLOAT_LAYERS``: per-output-channel symmetric int8, ``reduce_range``
  (7-bit, [-64, 64], see quantize.py) by default; the scale follows the weights (max |w| / 64) at every step, as
  MinMax computes it from the final weights, and the exported graph holds the weights as int8 initializers;
* activations: per-tensor asymmetric uint8 [0, 255] on the tensors ONNX Runtime's QDQ quantizer quantizes in the
  PTQ graph (each input of a quantized conv, a residual Add or a Concat, and each Concat output; found on a
  torch.fx trace of the network), MinMax-initialised on LR crops of the video's own frames
  (``quantize.calibration_crops``, the PTQ calibration set), then fixed or learned (LSQ gradients,
  ``learn_ranges``). CARN-M applies its shared residual unit three times per block; each application is its own
  traced tensor, so it gets its own range (as in the PTQ graph);
* the float layers (mean shifts, entry conv, top-level fusions, upsampler, exit conv) and all biases stay float.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from selftransfer_trainer.quantize import FLOAT_LAYERS, calibration_crops
from vs_selftransfer.model import CARN

# QAT defaults: a short run from the fine-tuned weights, the learning rate decaying from half train.py's peak.
# Measured on the sample clip's fine-tuned bundle (OpenVINO int8, held-out frames 20/60/100/130): loss against fp32
# 0.098 dB with MinMax ranges alone, 0.086 after 50 steps at 2e-5, 0.078 after 50 steps at 1e-4.
QAT_STEPS = 50
QAT_LR = 1e-4
QAT_BATCH = 16
QAT_PATCH = 48
CALIB_BATCH = 8  # crops per calibration forward pass (min/max do not depend on the batching)
ACT_QMIN, ACT_QMAX = 0, 255  # uint8 activations
WEIGHT_QMAX = {True: 64, False: 127}  # symmetric int8 weights: reduce_range -> [-64, 64], else [-127, 127]


@dataclass(frozen=True)
class QATConfig:
    steps: int = QAT_STEPS
    lr: float = QAT_LR
    batch: int = QAT_BATCH
    patch: int = QAT_PATCH
    seed: int = 0
    threads: int = 0  # 0: leave torch's thread count as it is
    reduce_range: bool = True
    learn_ranges: bool = False

    def __post_init__(self):
        if type(self.steps) is not int or self.steps < 0:
            raise ValueError(f"QAT steps must be an integer >= 0, not {self.steps!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr >= 0):
            raise ValueError(f"QAT lr must be a finite number >= 0, not {self.lr!r}")
        for name in ("batch", "patch"):
            if type(getattr(self, name)) is not int or getattr(self, name) < 1:
                raise ValueError(f"QAT {name} must be a positive integer, not {getattr(self, name)!r}")
        if type(self.threads) is not int or self.threads < 0:
            raise ValueError(f"QAT threads must be an integer >= 0, not {self.threads!r}")


class ActQuant(nn.Module):
    """Per-tensor uint8 fake quantization of one activation tensor: MinMax-observed while ``observing``, then fixed or
    learned (``torch._fake_quantize_learnable_per_tensor_affine``: LSQ+ gradients for the scale and zero point)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("lo", torch.tensor(float("inf")))
        self.register_buffer("hi", torch.tensor(float("-inf")))
        self.scale = nn.Parameter(torch.ones(1), requires_grad=False)  # shape (1,): the LSQ op wants it
        self.zero_point = nn.Parameter(torch.zeros(1), requires_grad=False)
        self.observing = True
        self.qparams: tuple[float, int] | None = None  # (scale, zero point) as constants, for the fixed form
        self.exporting = False

    def freeze_range(self, learn: bool) -> None:
        """End observation: the MinMax scale and zero point exactly as ONNX Runtime's calibrator computes them
        (range widened to include 0, zero point rounded), learned from here on when ``learn``."""
        lo, hi = min(float(self.lo), 0.0), max(float(self.hi), 0.0)
        scale = (hi - lo) / (ACT_QMAX - ACT_QMIN) if hi > lo else 1.0
        self.scale.data.fill_(scale)
        self.zero_point.data.fill_(float(min(max(round(ACT_QMIN - lo / scale), ACT_QMIN), ACT_QMAX)))
        self.scale.requires_grad_(learn)
        self.zero_point.requires_grad_(learn)
        self.observing = False
        self.sync()

    def sync(self) -> None:
        """Take the (learned) scale and zero point as the constants the fixed form and the export use."""
        scale, zero = self.scale.detach().item(), self.zero_point.detach().item()
        self.qparams = (max(scale, 1e-8), int(min(max(round(zero), ACT_QMIN), ACT_QMAX)))

    def forward(self, x):
        if self.observing:
            self.lo.copy_(torch.minimum(self.lo, x.detach().min()))
            self.hi.copy_(torch.maximum(self.hi, x.detach().max()))
            return x
        if self.scale.requires_grad and self.training:
            return torch._fake_quantize_learnable_per_tensor_affine(
                x, self.scale, self.zero_point, ACT_QMIN, ACT_QMAX, 1.0 / math.sqrt(x.numel() * ACT_QMAX))
        scale, zero = self.qparams
        if self.exporting:
            # The same arithmetic as the ops the ONNX exporter writes as QuantizeLinear/DequantizeLinear (it
            # cannot trace the fake-quant ops).
            q = torch.ops.quantized_decomposed.quantize_per_tensor(x, scale, zero, ACT_QMIN, ACT_QMAX, torch.uint8)
            return torch.ops.quantized_decomposed.dequantize_per_tensor(q, scale, zero, ACT_QMIN, ACT_QMAX,
                                                                       torch.uint8)
        return torch.fake_quantize_per_tensor_affine(x, scale, zero, ACT_QMIN, ACT_QMAX)


class QuantConv(nn.Module):
    """A conv with fake-quantized weights: per output channel, symmetric. Its input is quantized by the ActQuant
    placed on the tensor that feeds it (``QATModel``)."""

    def __init__(self, conv: nn.Conv2d, reduce_range: bool):
        super().__init__()
        self.conv = conv
        self.qmax = WEIGHT_QMAX[reduce_range]
        for name in ("w_int8", "w_scale", "w_zero"):  # set by freeze_for_export
            self.register_buffer(name, None)

    def weight_scale(self) -> torch.Tensor:
        return (self.conv.weight.detach().abs().amax(dim=(1, 2, 3)) / self.qmax).clamp(min=1e-12)

    def quantized_weight(self):
        if self.w_int8 is not None:  # exporting: int8 weights and their scales, as the graph's initializers
            return torch.ops.quantized_decomposed.dequantize_per_channel(
                self.w_int8, self.w_scale, self.w_zero, 0, -self.qmax, self.qmax, torch.int8)
        # Training: the scale follows the weights at every step, as MinMax computes it from the final weights.
        scale = self.weight_scale()
        zero = torch.zeros(scale.shape[0], dtype=torch.int32, device=scale.device)
        return torch.fake_quantize_per_channel_affine(self.conv.weight, scale, zero, 0, -self.qmax, self.qmax)

    def freeze_for_export(self) -> None:
        """The weights as int8 with their per-channel scales (buffers)."""
        scale = self.weight_scale()
        q = torch.clamp(torch.round(self.conv.weight.detach() / scale.view(-1, 1, 1, 1)), -self.qmax, self.qmax)
        self.w_int8 = q.to(torch.int8)
        self.w_scale = scale.float()
        self.w_zero = torch.zeros(scale.shape[0], dtype=torch.int64)

    def forward(self, x):
        c = self.conv
        return F.conv2d(x, self.quantized_weight(), c.bias, c.stride, c.padding, c.dilation, c.groups)


def _is_concat(node) -> bool:
    return node.op == "call_function" and node.target in (torch.cat, torch.concat)


def _is_add(node) -> bool:
    import operator

    return node.op == "call_function" and node.target in (operator.add, torch.add)


class QATModel(nn.Module):
    """``model`` (deep-copied) traced with torch.fx, with every conv outside FLOAT_LAYERS replaced by a QuantConv
    and an ActQuant on every activation tensor where ONNX Runtime's QDQ quantizer puts one in the PTQ graph: each
    input of a quantized conv, a residual Add or a Concat, and each Concat output. Each traced tensor gets its own
    range, so the shared residual unit of CARN-M has one per application (as in the PTQ graph).

    The quantized tensor feeds the quantized ops; the float layers read the unquantized one unless
    ``float_consumers_quantized`` (PTQ's graph feeds them the quantized tensor: on the fine-tuned sample bundle
    that costs 0.14 dB instead of 0.10 before any QAT step)."""

    def __init__(self, model: CARN, reduce_range: bool = True, float_consumers_quantized: bool = False):
        super().__init__()
        import torch.fx

        net = copy.deepcopy(model).float().cpu().eval()
        self.qconvs: dict[str, QuantConv] = {}
        for name, module in list(net.named_modules()):
            for child_name, child in list(module.named_children()):
                full = f"{name}.{child_name}" if name else child_name
                if isinstance(child, nn.Conv2d) and not f"{full}.".startswith(FLOAT_LAYERS):
                    self.qconvs[full] = QuantConv(child, reduce_range)
                    setattr(module, child_name, self.qconvs[full])
        class Tracer(torch.fx.Tracer):  # a QuantConv is one node: its weight quantization is decided at run time
            def is_leaf_module(self, m, qualname):
                return isinstance(m, QuantConv) or super().is_leaf_module(m, qualname)

        graph = Tracer().trace(net)
        graph_module = torch.fx.GraphModule(net, graph)

        def quantized_op(node) -> bool:
            return (node.op == "call_module" and node.target in self.qconvs) or _is_add(node) or _is_concat(node)

        tensors = []
        for node in graph.nodes:
            if node.op in ("placeholder", "output", "get_attr"):
                continue
            if _is_concat(node) or any(quantized_op(user) for user in node.users):
                tensors.append(node)
        self.acts = nn.ModuleList()
        for node in tensors:
            name = f"act_{len(self.acts)}"
            act = ActQuant()
            self.acts.append(act)
            graph_module.add_submodule(name, act)
            with graph.inserting_after(node):
                quantized = graph.call_module(name, (node,))
            node.replace_all_uses_with(quantized, delete_user_cb=lambda user: user is not quantized and (
                float_consumers_quantized or quantized_op(user)))
        graph.lint()
        graph_module.recompile()
        self.net = graph_module

    def forward(self, x):
        return self.net(x)

    def freeze_ranges(self, learn: bool) -> None:
        for a in self.acts:
            a.freeze_range(learn)

    def freeze_for_export(self) -> None:
        for q in self.qconvs.values():
            q.freeze_for_export()
        for a in self.acts:
            a.sync()
            a.exporting = True


def calibrate(qmodel: QATModel, calib_lr: list[np.ndarray], seed: int) -> int:
    """MinMax ranges of every quantized conv input over the PTQ calibration crops; returns the number of crops."""
    crops = calibration_crops(calib_lr, seed)
    qmodel.eval()
    with torch.no_grad():
        for i in range(0, len(crops), CALIB_BATCH):
            batch = crops[i:i + CALIB_BATCH]
            if len({c.shape for c in batch}) == 1:
                qmodel(torch.from_numpy(np.concatenate(batch)))
            else:  # frames smaller than the crop give smaller crops
                for crop in batch:
                    qmodel(torch.from_numpy(crop))
    return len(crops)


def fine_tune(qmodel: QATModel, pairs_path: Path, cfg: QATConfig) -> list[float]:
    """``cfg.steps`` Adam steps of L1 loss on random patches of the pairs file's training frames (the fine-tune's
    sampler), the learning rate decaying as a cosine to 0; returns the loss of every step."""
    from selftransfer_trainer.pairs import Pairs, PatchSampler

    with Pairs(pairs_path) as pairs:
        sampler = PatchSampler(pairs, patch=cfg.patch, batch=cfg.batch, seed=cfg.seed)
    params = [p for p in qmodel.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    qmodel.train()
    qmodel.to(memory_format=torch.channels_last)  # the faster layout for these convs on the CPU (as train.py)
    losses = []
    for step in range(cfg.steps):
        for g in optimizer.param_groups:
            g["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        lr_patches, hr_patches = sampler.sample()
        sr = qmodel(lr_patches.contiguous(memory_format=torch.channels_last))
        loss = F.l1_loss(sr, hr_patches.contiguous(memory_format=torch.channels_last))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise RuntimeError(f"quantization-aware fine-tuning diverged at step {step + 1} (loss {value})")
        losses.append(value)
    qmodel.to(memory_format=torch.contiguous_format).eval()
    return losses


def qdq_onnx_bytes(qmodel: QATModel) -> bytes:
    """The fake-quant model as a QDQ ONNX graph, exported by ``export.onnx_bytes`` (input "lr", output "sr", dynamic
    N/H/W): int8 weight initializers with their DequantizeLinear (as PTQ ships them: a quarter of the size, and
    OpenVINO reads them as int8 weights), a QuantizeLinear/DequantizeLinear pair on each quantized activation."""
    from selftransfer_trainer.export import onnx_bytes

    import torch.ao.quantization.fx._decomposed  # noqa: F401 - registers torch.ops.quantized_decomposed

    qmodel.eval()
    qmodel.freeze_for_export()
    return onnx_bytes(qmodel)


def check_qdq_graph(data: bytes, qmodel: QATModel) -> float:
    """The exported graph, run by ONNX Runtime, against the fake-quant model it was exported from (export form),
    within the int8 probe tolerance: a graph that does not compute what was trained never ships. Returns the max
    absolute difference (int8 kernels round a little differently from the fake-quant ops)."""
    from selftransfer_trainer.export import ExportCheckError
    from vs_selftransfer.backend_ort import make_session, session_runner
    from vs_selftransfer.bundle import PROBE_TOLERANCE, check_onnx
    from vs_selftransfer.graph_check import GraphCheckError, check_graph
    from vs_selftransfer.model import torch_runner

    check_onnx(data, "quantization-aware model.int8.onnx")
    try:
        return check_graph("quantization-aware model.int8.onnx", lambda: session_runner(make_session(data, threads=1)),
                           torch_runner(qmodel, "cpu", channels_last=False), PROBE_TOLERANCE["int8"])
    except GraphCheckError as e:
        raise ExportCheckError(f"export check failed: {e}; nothing was written") from e


def qat_graph(model: CARN, pairs_path: str | Path, calib_lr: list[np.ndarray], cfg: QATConfig = QATConfig()
              ) -> tuple[bytes, dict]:
    """Quantization-aware fine-tuning of ``model`` (left unchanged) on the pairs file's training frames, calibrated
    on ``calib_lr`` (RGB uint8 HWC LR frames of the same video). Returns the QDQ ONNX graph and a report for the
    manifest (``precision.int8.calibration``)."""
    if not calib_lr:
        raise ValueError("quantization-aware fine-tuning needs LR calibration frames")
    pairs_path = Path(pairs_path)
    threads_before = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        torch.manual_seed(cfg.seed)
        t0 = time.perf_counter()
        qmodel = QATModel(model, cfg.reduce_range)
        crops = calibrate(qmodel, calib_lr, cfg.seed)
        qmodel.freeze_ranges(cfg.learn_ranges)
        t1 = time.perf_counter()
        losses = fine_tune(qmodel, pairs_path, cfg) if cfg.steps else []
        t2 = time.perf_counter()
        data = qdq_onnx_bytes(qmodel)
        check_diff = check_qdq_graph(data, qmodel)
    finally:
        torch.set_num_threads(threads_before)
    weights = "s8 [-64, 64] (reduce_range)" if cfg.reduce_range else "s8 [-127, 127]"
    return data, {
        "method": "QAT", "crops": crops, "frames": len(calib_lr),
        "format": f"QDQ per-channel symmetric {weights} weights / per-tensor u8 activations "
                  f"where ONNX Runtime's QDQ quantizer puts them",
        "float_layers": list(FLOAT_LAYERS), "ranges": "learned (LSQ)" if cfg.learn_ranges else "MinMax, fixed",
        "steps": cfg.steps, "lr": cfg.lr, "batch": cfg.batch, "patch": cfg.patch, "seed": cfg.seed,
        "loss_first": losses[0] if losses else None, "loss_last": float(np.mean(losses[-10:])) if losses else None,
        "calibration_s": t1 - t0, "train_s": t2 - t1, "s_per_step": (t2 - t1) / cfg.steps if cfg.steps else None,
        "export_s": time.perf_counter() - t2, "check_max_abs_diff": check_diff,
    }
