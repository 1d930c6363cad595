"""``selftransfer train``: fine-tune CARN-M on a pairs file (one flat loop, in the spirit of nanoGPT's train.py).

The loop: random LR/HR patches (``selftransfer_trainer.pairs.PatchSampler``), L1 loss, Adam, a cosine learning-rate
decay after a short linear warm-up, gradient-norm clipping. At intervals the model upscales the held-out validation
frames and is scored by Y-PSNR (``selftransfer_trainer.validate``). Before the first step the same frames are scored
for bicubic upsampling (the SR literature's baseline) and for the initial ("generic") weights. The best validated
weights are kept; when no fine-tuned step beats the generic weights on validation, the run ships the generic weights
and says so (``TrainResult.shipped == "generic"``). Validation always runs in fp32, as the exported model does,
whatever precision the training steps use.

CPU defaults: every core (``torch.set_num_threads``), channels-last tensors, fp32 (bf16 autocast is opt-in, see
``resolve_precision``). GPU: fp16 autocast with a gradient scaler, deterministic cuDNN kernels.

Budget: ``steps`` or ``minutes``. A step budget is the cosine horizon and makes the run deterministic. A minutes
budget covers the whole call (baseline scoring, steps, validations, checkpoints) and ends, like a step budget, with a
validation and best selection. The cosine schedule needs a horizon in steps, so it is estimated: after
``PROBE_STEPS`` steps from the measured seconds per step (the first step, which pays for allocations, excluded) and
the measured cost of one validation, and re-estimated at every validation, because on a shared machine the speed
drifts. The schedule is a function of *progress* in [0, 1]; when the horizon moves, progress continues linearly from
where it is to 1 at the new horizon, so the learning rate never jumps. If time runs out anyway, the run stops early
and validates. A minutes budget is therefore not bit-reproducible; a steps budget is.

Output in ``out_dir``: ``checkpoint.pt`` (everything needed to resume exactly: the weights being trained, optimizer,
schedule, step, RNG states, sampler state, best weights, configs; written atomically every ``checkpoint_seconds`` and
at every validation; its ``model`` entry is the best validated weights so far, so exporting a checkpoint exports what
would ship), ``model.pth`` (the shipped weights with their model config and validation figures) and
``result.json``. Every file is read back with ``torch.load(weights_only=True)``: only tensors, plain containers and
primitive values are stored (the typed state below is saved as plain dicts).

Resume: the same command with ``--resume`` continues from ``checkpoint.pt``: same weights, optimizer moments,
schedule, sampler position and RNG states, so a steps-budget run gives the same loss curve as an uninterrupted one.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vs_selftransfer.errors import UserError
from vs_selftransfer.files import atomic_write
from vs_selftransfer.model import ModelConfig, build_model, check_known_keys
from vs_selftransfer.tiling import OVERLAP
from selftransfer_trainer.validate import BACKENDS as VAL_BACKENDS

CHECKPOINT = "checkpoint.pt"
MODEL = "model.pth"
RESULT = "result.json"
CHECKPOINT_FORMAT = "selftransfer-train-checkpoint"
CHECKPOINT_VERSION = 1
PRECISIONS = ("auto", "fp32", "bf16", "amp")
DEVICES = ("auto", "cpu", "cuda")
PROBE_STEPS = 3  # steps run before a minutes budget's horizon is first estimated
TIME_MARGIN = 0.97  # fraction of the remaining time a minutes-budget horizon plans to use (the rest absorbs noise)
# Fields that may differ between a run and its resumption (they change speed or bookkeeping, not the arithmetic).
RESUMABLE_CHANGES = ("device", "threads", "checkpoint_seconds", "minutes", "val_backend")
# The command-line flag of each setting (`train` and `fit` share them, see add_config_arguments): every error about a
# setting names it through ``flag``. Settings without a flag are Python-API only.
FLAGS = {
    "scale": "--scale", "patch": "--patch", "batch": "--batch", "lr": "--lr", "steps": "--steps",
    "minutes": "--minutes", "val_every": "--val-every", "seed": "--seed", "device": "--device",
    "threads": "--threads", "precision": "--precision", "init": "--init", "resume": "--resume",
}


def flag(setting: str) -> str:
    """How an error names a setting: its command-line flag, or ``train config NAME`` for one without a flag."""
    return FLAGS.get(setting, f"train config {setting}")


class ConfigError(ValueError):
    """A bad TrainConfig value. ``str()`` says it in the config's words; ``for_cli()`` names the flag."""

    def __init__(self, setting: str, value, why: str):
        super().__init__(f"train config {setting}={value!r}: {why}")
        self.setting, self.value, self.why = setting, value, why

    def for_cli(self) -> str:
        return f"{flag(self.setting)} {self.value!r}: {self.why}"


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides what the training does; saved in every checkpoint and bundle manifest.

    To add a setting: a field here whose default keeps today's behaviour (a checkpoint made before the setting
    existed resumes with that default), its check in ``__post_init__``, its flag (if it has one) in FLAGS,
    add_config_arguments and config_from_args, and its use in ``train``."""

    scale: int = 0  # 0: the pairs file's scale
    arch: str = "carn_m"
    patch: int = 48  # LR patch side (the HR patch is scale x larger)
    batch: int = 16
    lr: float = 2e-4  # peak learning rate, after warm-up
    warmup_steps: int = 10  # linear warm-up; never more than a tenth of a steps budget
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global gradient norm (0: no clipping)
    steps: int = 0  # budget in optimizer steps, or
    minutes: float = 0.0  # budget in wall-clock minutes (whole call); exactly one of the two is set
    val_every: int = 0  # steps between validations; 0: four, evenly spaced over the schedule (the last at the end)
    val_tile: int = 0  # LR tile side for validation upscaling; 0: the automatic rule (vs_selftransfer.tiling)
    val_overlap: int = OVERLAP  # LR px of context per tile; >= the receptive radius (22) keeps tiles exact
    checkpoint_seconds: float = 60.0  # also checkpoint at every validation; 0: after every step
    seed: int = 0
    device: str = "auto"
    threads: int = 0  # CPU threads; 0: every core this process may use
    precision: str = "auto"  # fp32 | bf16 (CPU autocast) | amp (CUDA fp16) | auto (see resolve_precision)
    channels_last: bool = True
    val_backend: str = "auto"  # auto: ONNX Runtime on the CPU for large validation sets, else PyTorch | ort | torch

    def __post_init__(self):
        def bad(name, why):
            raise ConfigError(name, getattr(self, name), why)

        def is_int(v):
            return type(v) is int

        def is_num(v):
            return type(v) in (int, float) and math.isfinite(v)

        if not is_int(self.scale) or self.scale not in (0, 2, 3, 4):
            bad("scale", "must be 2, 3 or 4 (0: the pairs file's)")
        if not is_int(self.patch) or self.patch < 8:
            bad("patch", "must be an integer >= 8 (LR pixels)")
        if not is_int(self.batch) or self.batch < 1:
            bad("batch", "must be a positive integer")
        if not is_num(self.lr) or self.lr < 0:
            bad("lr", "must be a finite number >= 0")
        if not is_int(self.warmup_steps) or self.warmup_steps < 0:
            bad("warmup_steps", "must be an integer >= 0")
        if (not isinstance(self.betas, (tuple, list)) or len(self.betas) != 2
                or not all(is_num(b) and 0 <= b < 1 for b in self.betas)):
            bad("betas", "must be two numbers in [0, 1)")
        if not is_num(self.weight_decay) or self.weight_decay < 0:
            bad("weight_decay", "must be a number >= 0")
        if not is_num(self.grad_clip) or self.grad_clip < 0:
            bad("grad_clip", "must be a number >= 0 (0: no clipping)")
        if not is_int(self.steps) or self.steps < 0:
            bad("steps", "must be an integer >= 0")
        if not is_num(self.minutes) or self.minutes < 0:
            bad("minutes", "must be a number >= 0")
        if self.steps and self.minutes:
            raise ValueError("train config: give a budget in steps or in minutes, not both")
        if not is_int(self.val_every) or self.val_every < 0:
            bad("val_every", "must be an integer >= 0 (0: automatic)")
        if not is_int(self.val_tile) or self.val_tile < 0:
            bad("val_tile", "must be an integer >= 0 (0: automatic)")
        if not is_int(self.val_overlap) or self.val_overlap < 0:
            bad("val_overlap", "must be an integer >= 0")
        if not is_num(self.checkpoint_seconds) or self.checkpoint_seconds < 0:
            bad("checkpoint_seconds", "must be a number >= 0")
        if not is_int(self.seed) or self.seed < 0:
            bad("seed", "must be an integer >= 0")
        if self.device not in DEVICES:
            bad("device", f"must be one of {', '.join(DEVICES)}")
        if not is_int(self.threads) or self.threads < 0:
            bad("threads", "must be an integer >= 0 (0: all cores)")
        if self.precision not in PRECISIONS:
            bad("precision", f"must be one of {', '.join(PRECISIONS)}")
        if self.val_backend not in VAL_BACKENDS:
            bad("val_backend", f"must be one of {', '.join(VAL_BACKENDS)}")
        if type(self.channels_last) is not bool:
            bad("channels_last", "must be true or false")
        object.__setattr__(self, "betas", (float(self.betas[0]), float(self.betas[1])))
        ModelConfig(arch=self.arch)  # validates the architecture name

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        check_known_keys(cls, d, "train config")
        d = dict(d)
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)


@dataclass
class TrainResult:
    shipped: str  # "selftransfer" or "generic"
    model: torch.nn.Module  # the shipped weights, on the CPU, eval mode, contiguous
    model_config: ModelConfig
    train_config: TrainConfig
    bicubic_psnr_y: float
    generic_psnr_y: float
    selftransfer_psnr_y: float | None  # best validated fine-tuned step (None when no step ran)
    shipped_psnr_y: float
    steps: int
    best_step: int  # 0 when the generic weights are shipped
    horizon: int
    s_per_step: float | None
    images_per_s: float | None
    wall_s: float  # time spent in train() over all (resumed) calls
    device: str
    precision: str
    threads: int
    val_frames: list[int]
    history: list[dict] = field(default_factory=list)  # one entry per validation
    losses: list[float] = field(default_factory=list)  # training loss of every step
    message: str = ""

    def validation(self) -> dict:
        """The manifest's ``validation`` block."""
        return {
            "metric": "psnr_y (BT.601 studio Y, border shaved by the scale, 8-bit quantized outputs)",
            "frames": list(self.val_frames),
            "bicubic": "MATLAB imresize bicubic upsampling (selftransfer_trainer.degrade.imresize)",
            "bicubic_psnr_y": self.bicubic_psnr_y,
            "generic_psnr_y": self.generic_psnr_y,
            "selftransfer_psnr_y": self.selftransfer_psnr_y,
            "shipped_psnr_y": self.shipped_psnr_y,
            "shipped": self.shipped,
            "steps": self.steps,
            "best_step": self.best_step,
            "message": self.message,
        }

    def to_dict(self) -> dict:
        return {
            "validation": self.validation(),
            "model_config": self.model_config.to_dict(),
            "train_config": self.train_config.to_dict(),
            "horizon": self.horizon,
            "s_per_step": self.s_per_step,
            "images_per_s": self.images_per_s,
            "wall_s": self.wall_s,
            "device": self.device,
            "precision": self.precision,
            "threads": self.threads,
            "history": self.history,
            "losses": self.losses,
        }


# -- the loop's state (saved in the checkpoint as plain dicts: ``dataclasses.asdict``) ------------------------------

@dataclass
class Schedule:
    """Where the learning-rate schedule stands: progress runs linearly from ``p0`` at step ``s0`` to 1 at
    ``horizon``; a minutes budget moves the horizon (``replan``) without moving the progress already made."""

    s0: int
    p0: float
    horizon: int | None  # None: a minutes budget before its first estimate
    warmup: int  # linear warm-up steps


@dataclass
class Best:
    """The best validated weights so far: the initial ("generic") ones at step 0 until a fine-tuned step beats them."""

    step: int
    psnr_y: float
    model: dict  # CPU state dict


@dataclass
class RunState:
    """What the loop accumulates over a run, resumed calls included."""

    bicubic_psnr_y: float
    generic_psnr_y: float
    history: list[dict] = field(default_factory=list)  # one entry per validation
    losses: list[float] = field(default_factory=list)  # training loss of every step
    validated_quarters: int = 0  # quarters of the schedule validated so far (val_every 0)
    elapsed_s: float = 0.0  # wall time of every call up to the last checkpoint
    step_s: float = 0.0  # time of the timed steps (all but the first, which pays for allocations)
    timed_steps: int = 0
    train_s: float = 0.0  # time of every step, for time-to-quality figures
    val_s: float = 0.0  # time of every validation, the generic baseline's included
    n_val: int = 0
    planned: bool = False  # the horizon is known: a steps budget, or a minutes budget after PROBE_STEPS
    done: bool = False

    def s_per_step(self) -> float:
        return self.step_s / max(1, self.timed_steps)

    def s_per_validation(self) -> float:
        return self.val_s / self.n_val


def warmup_for(cfg: TrainConfig) -> int:
    return min(cfg.warmup_steps, max(1, cfg.steps // 10)) if cfg.steps else cfg.warmup_steps


def progress_at(step: int, sched: Schedule) -> float:
    """Schedule progress in [0, 1] after ``step`` steps: linear from (s0, p0) to (horizon, 1)."""
    if sched.horizon is None:  # a minutes budget before its first horizon estimate: still warming up
        return 0.0
    if sched.horizon <= sched.s0:
        return 1.0
    p = sched.p0 + (step - sched.s0) / (sched.horizon - sched.s0) * (1.0 - sched.p0)
    return min(max(p, 0.0), 1.0)


def lr_at(step: int, sched: Schedule, cfg: TrainConfig) -> float:
    """Learning rate of the step that follows ``step`` completed steps: linear warm-up, then cosine to zero."""
    warm = min(1.0, (step + 1) / sched.warmup) if sched.warmup else 1.0
    return cfg.lr * warm * 0.5 * (1.0 + math.cos(math.pi * progress_at(step, sched)))


def replan(step: int, sched: Schedule, cfg: TrainConfig, remaining_s: float, s_per_step: float, val_s: float,
           validated_quarters: int) -> Schedule:
    """Minutes budgets: a new horizon such that the steps and validations left fit the remaining time.
    Progress continues from where it is, so the learning rate stays continuous."""
    usable = remaining_s * TIME_MARGIN
    if cfg.val_every:  # one validation every val_every steps plus the final one
        fit = (usable - val_s) / (s_per_step + val_s / cfg.val_every)
    else:  # the quarters not yet validated, the final one included
        fit = (usable - (4 - validated_quarters) * val_s) / s_per_step
    return Schedule(s0=step, p0=progress_at(step, sched), horizon=step + max(0, int(fit)), warmup=sched.warmup)


def due_validation(step: int, sched: Schedule, cfg: TrainConfig, validated_quarters: int) -> bool:
    if step >= sched.horizon:
        return True
    if cfg.val_every:
        return step % cfg.val_every == 0
    return math.floor(progress_at(step, sched) * 4 + 1e-9) > validated_quarters


# -- device and precision ------------------------------------------------------------------------------------------

def model_config(cfg: TrainConfig, scale: int) -> ModelConfig:
    """The network a run with ``cfg`` trains at ``scale`` (CARN-M's grouped convolutions, as the official one)."""
    return ModelConfig(arch=cfg.arch, scale=scale, group=4 if cfg.arch == "carn_m" else 1)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{flag('device')} cuda: no CUDA device is available to PyTorch (use {flag('device')} cpu)")
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls/convolutions run natively instead of being emulated (slower than fp32)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto``: fp16 AMP on CUDA, fp32 on the CPU. bf16 on the CPU is opt-in (``--precision bf16``): without native
    bf16 it is slower than fp32, and its validation PSNR has not been measured on a CPU with native bf16 yet (see
    scripts/bench_train.py, which measures both)."""
    if name == "auto":
        return "amp" if device.type == "cuda" else "fp32"
    if name == "amp" and device.type != "cuda":
        raise UserError(f"{flag('precision')} amp is fp16 mixed precision on CUDA; on the CPU use fp32 or bf16")
    if name == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        print(f"selftransfer train: warning: this CPU has no native bf16 (AVX512-BF16/AMX); {flag('precision')} "
              f"bf16 autocast will be emulated and slower than fp32", file=sys.stderr)
    return name


def resolve_threads(threads: int) -> int:
    if threads:
        return threads
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def autocast_for(precision: str):
    """The context the forward pass runs in: fp16 autocast (amp, CUDA), bf16 autocast (CPU) or none (fp32)."""
    if precision == "amp":
        return lambda: torch.autocast("cuda", dtype=torch.float16)
    if precision == "bf16":
        return lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext


# -- checkpoints and files -----------------------------------------------------------------------------------------

def cpu_state(state: dict) -> dict:
    """A state dict of plain contiguous CPU tensors (channels-last and CUDA tensors saved as ordinary ones)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}


def rng_states() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }


def set_rng_states(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    name, keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = s["python"]
    random.setstate((version, tuple(internal), gauss_next))


def save_torch(path: Path, obj: dict) -> None:
    """torch.save into memory, then an atomic write: the file on disk is always complete."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write(path, buf.getvalue())


def load_checkpoint(path: Path) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - zip/unpickling errors of a damaged or foreign file
        raise UserError(f"{path}: not a readable training checkpoint ({e}); start over without "
                        f"{flag('resume')}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path}: not a selftransfer training checkpoint")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise UserError(f"{path}: checkpoint version {ckpt.get('version')} is not supported; start over")
    return ckpt


def remove_stale_temps(out_dir: Path) -> None:
    """Temp files of writes interrupted by a kill (atomic_write names them ``.NAME.XXXX.tmp``)."""
    for name in (CHECKPOINT, MODEL, RESULT):
        for tmp in out_dir.glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)


def write_json(path: Path, obj) -> None:
    atomic_write(path, (json.dumps(obj, indent=2, sort_keys=True, default=float) + "\n").encode())


def config_differences(saved: dict, cfg: TrainConfig) -> list[str]:
    """The settings (other than RESUMABLE_CHANGES) in which ``cfg`` differs from a checkpoint's; a setting the
    checkpoint predates counts as its default."""
    now = cfg.to_dict()
    try:
        saved = TrainConfig.from_dict(saved).to_dict()
    except (TypeError, ValueError):
        pass  # not a config this version reads: compare what it says
    return [f"{flag(k)}: checkpoint {saved.get(k)!r}, now {now[k]!r}" for k in now
            if k not in RESUMABLE_CHANGES and saved.get(k) != now[k]]


def open_pairs(path: str | os.PathLike, cfg: TrainConfig):
    """The pairs file (``selftransfer_trainer.pairs.Pairs``), checked for what a run needs: training frames,
    validation frames, the configured scale."""
    from selftransfer_trainer.pairs import Pairs

    pairs = Pairs(path)
    why = None
    if cfg.scale and cfg.scale != pairs.scale:
        why = f"{flag('scale')} {cfg.scale} does not match {path}, which holds x{pairs.scale} pairs"
    elif not pairs.val_indices:
        why = f"{path} has no validation frames: cannot tell whether training helps"
    elif not pairs.train_indices:
        why = f"{path} has no training frames"
    if why:
        pairs.close()
        raise UserError(why)
    return pairs


def shipping_message(best: Best, state: RunState) -> str:
    if best.step > 0:
        return (f"shipping step {best.step}: {best.psnr_y:.3f} dB vs generic {state.generic_psnr_y:.3f} dB "
                f"(+{best.psnr_y - state.generic_psnr_y:.3f} dB), bicubic {state.bicubic_psnr_y:.3f} dB")
    if not state.history:
        return "shipping the generic weights: no training step ran"
    tuned = max(h["psnr_y"] for h in state.history)
    return (f"shipping the generic weights: no fine-tuned step beat the generic weights on validation (best "
            f"{tuned:.3f} dB vs generic {state.generic_psnr_y:.3f} dB)")


def log(msg: str, bar) -> None:
    if bar is not None and not bar.disable:
        bar.write(msg, file=sys.stderr)
    else:
        print(msg, file=sys.stderr, flush=True)


# -- the loop -------------------------------------------------------------------------------------------------------

def train(pairs_path: str | os.PathLike, out_dir: str | os.PathLike, cfg: TrainConfig, init: str = "official",
          resume: bool = False, progress: bool | None = None, verbose: bool = True, on_step=None) -> TrainResult:
    """Fine-tune on ``pairs_path`` into ``out_dir``; see the module docstring.

    ``init``: "official", "none" or a weights path (ignored when resuming: the checkpoint has the weights).
    ``progress``: tqdm bar on stderr; None: only when stderr is a terminal. ``on_step(step, loss)`` is called after
    every step (tests use it to interrupt a run).
    """
    from tqdm import tqdm

    from selftransfer_trainer.pairs import PatchSampler
    from selftransfer_trainer.validate import Validator
    from selftransfer_trainer.weights import initial_model

    t_call = time.perf_counter()

    # The pairs, the run folder, and the checkpoint a resumed run continues from.
    pairs = open_pairs(pairs_path, cfg)  # first: a wrong pairs file must not leave an empty run folder behind
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        pairs.close()
        raise UserError(f"{out_dir}: exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out_dir)
    ckpt_path = out_dir / CHECKPOINT
    ckpt = load_checkpoint(ckpt_path) if resume and ckpt_path.is_file() else None
    if ckpt is not None and (diff := config_differences(ckpt["train_config"], cfg)):
        raise UserError(f"{ckpt_path} was made with other settings ({'; '.join(diff)}); resume with the same "
                        f"settings, or start over without {flag('resume')}")
    scale = pairs.scale
    mcfg = model_config(cfg, scale)

    # Device, precision, threads.
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    threads = resolve_threads(cfg.threads)
    if device.type == "cpu":
        torch.set_num_threads(threads)
    else:
        # Deterministic kernels: a seed gives one result (costs a little speed).
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True

    # Model, optimizer, data. The seed fixes a random init ("none") and the sampler's patch stream.
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    if ckpt is not None:
        model = build_model(ModelConfig.from_dict(ckpt["model_config"]))
        model.load_state_dict(ckpt["train_model"])
    else:
        try:
            model = initial_model(mcfg, init)
        except (ValueError, RuntimeError) as e:
            raise UserError(f"{flag('init')} {init}: {e}") from None
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(device=device, memory_format=memory_format).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "amp")
    sampler = PatchSampler(pairs, patch=cfg.patch, batch=cfg.batch, seed=cfg.seed)
    validate = Validator([pairs.val_pair(i) for i in range(len(pairs.val_indices))], scale, model, device,
                         backend=cfg.val_backend, threads=threads, channels_last=cfg.channels_last,
                         tile=cfg.val_tile, overlap=cfg.val_overlap)
    val_indices = list(pairs.val_indices)
    pairs.close()  # the sampler holds the training frames in memory

    # Where the run stands: fresh (the baselines, scored once: what the run has to beat) or resumed.
    if ckpt is None:
        t0 = time.perf_counter()
        bicubic = validate.bicubic()
        t1 = time.perf_counter()
        generic = validate(model)
        val_s = time.perf_counter() - t1
        if verbose:
            log(f"validation on {len(val_indices)} held-out frames: bicubic {bicubic:.3f} dB, generic {generic:.3f} "
                f"dB ({val_s:.1f} s per validation, bicubic {t1 - t0:.1f} s)", None)
        step = 0
        sched = Schedule(s0=0, p0=0.0, horizon=None if cfg.minutes else cfg.steps, warmup=warmup_for(cfg))
        best = Best(step=0, psnr_y=generic, model=cpu_state(model.state_dict()))
        # A zero steps budget is allowed: it scores bicubic and generic, and ships generic.
        state = RunState(bicubic_psnr_y=bicubic, generic_psnr_y=generic, val_s=val_s, n_val=1,
                         planned=not cfg.minutes, done=cfg.steps == 0 and not cfg.minutes)
    else:
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt["scaler"]:
            scaler.load_state_dict(ckpt["scaler"])
        sampler.load_state_dict(ckpt["sampler"])
        set_rng_states(ckpt["rng"])
        step, sched, state = ckpt["step"], Schedule(**ckpt["schedule"]), RunState(**ckpt["state"])
        best = Best(model=ckpt["model"], **ckpt["best"])
        if verbose:
            log(f"resuming {ckpt_path} at step {step}/{sched.horizon}", None)
    budget_s = cfg.minutes * 60.0
    elapsed_before = state.elapsed_s if ckpt is not None else 0.0  # time of the calls this one resumes

    def elapsed() -> float:
        return elapsed_before + (time.perf_counter() - t_call)

    def checkpoint() -> None:
        state.elapsed_s = elapsed()
        save_torch(ckpt_path, {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": step,
            "schedule": dataclasses.asdict(sched), "state": dataclasses.asdict(state),
            # "model" is what would ship if the run stopped now (the best validated weights, generic at first), so
            # `selftransfer export checkpoint.pt` does the right thing; the weights being trained are "train_model".
            "model": best.model, "best": {"step": best.step, "psnr_y": best.psnr_y},
            "train_model": cpu_state(model.state_dict()), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else {},
            "sampler": sampler.state_dict(), "rng": rng_states(),
            "train_config": cfg.to_dict(), "model_config": mcfg.to_dict(),
            "pairs": {"path": str(Path(pairs_path).resolve()), "scale": scale, "val_indices": val_indices},
        })

    if ckpt is None:
        checkpoint()  # the baselines are never measured twice
    autocast = autocast_for(precision)
    show = progress if progress is not None else sys.stderr.isatty()
    bar = tqdm(total=None if sched.horizon is None else max(sched.horizon, step), initial=step,
               disable=not show, file=sys.stderr, unit="step", dynamic_ncols=True, desc="fine-tune")
    last_ckpt = time.perf_counter()
    batches = iter(sampler)

    while not state.done:
        # One optimizer step.
        t_step = time.perf_counter()
        lr_patches, hr_patches = next(batches)
        lr_patches = lr_patches.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        hr_patches = hr_patches.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, sched, cfg)
        with autocast():
            sr = model(lr_patches)
        loss = F.l1_loss(sr.float(), hr_patches)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise RuntimeError(f"training diverged at step {step + 1} (loss {loss_value}); lower {flag('lr')}")
        step += 1
        state.losses.append(loss_value)
        state.train_s += time.perf_counter() - t_step
        if step > 1:  # the first step pays for allocations and would skew the estimate
            state.step_s += time.perf_counter() - t_step
            state.timed_steps += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", val=f"{best.psnr_y:.2f}dB", refresh=False)

        # A minutes budget: the first horizon once the step time is known; an early end when time runs out.
        if budget_s:
            if not state.planned and step >= PROBE_STEPS:
                sched = replan(step, sched, cfg, budget_s - elapsed(), state.s_per_step(), state.s_per_validation(),
                               state.validated_quarters)
                state.planned = True
                if verbose:
                    log(f"minutes budget: {state.s_per_step():.2f} s/step, {state.s_per_validation():.1f} "
                        f"s/validation: planning {sched.horizon} steps", bar)
            if budget_s - elapsed() < state.s_per_step() + state.s_per_validation():
                # Out of time: end here, with the final validation.
                sched = Schedule(s0=step, p0=progress_at(step, sched), horizon=step, warmup=sched.warmup)
                state.planned = True
            if sched.horizon is not None:
                bar.total = max(sched.horizon, step)

        # Validation (and the best weights), then a checkpoint; or a checkpoint when it is time for one.
        if state.planned and due_validation(step, sched, cfg, state.validated_quarters):
            t_val = time.perf_counter()
            score = validate(model)
            state.val_s += time.perf_counter() - t_val
            state.n_val += 1
            state.validated_quarters = math.floor(progress_at(step, sched) * 4 + 1e-9)
            window = state.losses[-min(20, step):]
            state.history.append({"step": step, "psnr_y": score, "loss": float(np.mean(window)),
                                  "lr": lr_at(step - 1, sched, cfg), "elapsed_s": elapsed(),
                                  "train_s": state.train_s})
            if score > best.psnr_y:
                best = Best(step=step, psnr_y=score, model=cpu_state(model.state_dict()))
            if verbose:
                log(f"step {step}/{sched.horizon}: loss {np.mean(window):.4f}, val {score:.3f} dB "
                    f"(generic {state.generic_psnr_y:.3f}, best {best.psnr_y:.3f} at step {best.step})", bar)
            bar.set_postfix(loss=f"{loss_value:.4f}", val=f"{score:.2f}dB", refresh=True)
            if budget_s and step < sched.horizon:
                sched = replan(step, sched, cfg, budget_s - elapsed(), state.s_per_step(), state.s_per_validation(),
                               state.validated_quarters)
                bar.total = max(sched.horizon, step)
            # Done at the horizon; a replanned horizon at this very step means no time is left for another.
            state.done = step >= sched.horizon
            checkpoint()
            last_ckpt = time.perf_counter()
        elif time.perf_counter() - last_ckpt >= cfg.checkpoint_seconds:
            checkpoint()
            last_ckpt = time.perf_counter()
        if on_step is not None:
            on_step(step, loss_value)
    bar.close()

    # The result: the best validated weights, or the generic ones when nothing beat them.
    shipped_model = build_model(mcfg)
    shipped_model.load_state_dict(best.model)
    shipped_model.eval()
    tuned = [h["psnr_y"] for h in state.history]
    s_per_step = state.s_per_step() if state.timed_steps else None
    result = TrainResult(
        shipped="selftransfer" if best.step > 0 else "generic", model=shipped_model, model_config=mcfg,
        train_config=cfg, bicubic_psnr_y=state.bicubic_psnr_y, generic_psnr_y=state.generic_psnr_y,
        selftransfer_psnr_y=max(tuned) if tuned else None, shipped_psnr_y=best.psnr_y, steps=step,
        best_step=best.step, horizon=sched.horizon, s_per_step=s_per_step,
        images_per_s=cfg.batch / s_per_step if s_per_step else None, wall_s=elapsed(), device=str(device),
        precision=precision, threads=threads, val_frames=val_indices, history=state.history, losses=state.losses,
        message=shipping_message(best, state))
    save_torch(out_dir / MODEL, {"model": best.model, "model_config": mcfg.to_dict(),
                                 "validation": result.validation()})
    write_json(out_dir / RESULT, result.to_dict())
    if verbose:
        log(result.message, None)
    return result


# -- CLI ------------------------------------------------------------------------------------------------------------

def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Training options shared by ``train`` and ``fit`` (their flags are FLAGS')."""
    d = TrainConfig()
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument(FLAGS["steps"], type=int, default=None, help="budget in optimizer steps (deterministic)")
    budget.add_argument(FLAGS["minutes"], type=float, default=None,
                        help="budget in wall-clock minutes for the training stage (default: 5)")
    parser.add_argument(FLAGS["init"], default="official",
                        help="initial weights: official (the CARN-M weights shipped with selftransfer), none, or a "
                             ".pth/.safetensors/.stm path (default: official)")
    parser.add_argument(FLAGS["lr"], type=float, default=d.lr, help=f"peak learning rate (default {d.lr})")
    parser.add_argument(FLAGS["batch"], type=int, default=d.batch, help=f"patches per step (default {d.batch})")
    parser.add_argument(FLAGS["patch"], type=int, default=d.patch, help=f"LR patch side in px (default {d.patch})")
    parser.add_argument(FLAGS["val_every"], type=int, default=d.val_every,
                        help="steps between validations (default 0: four, evenly spaced, the last at the end)")
    parser.add_argument(FLAGS["seed"], type=int, default=d.seed, help="seed of the init and the patch stream")
    parser.add_argument(FLAGS["device"], choices=DEVICES, default=d.device, help="auto: CUDA when available")
    parser.add_argument(FLAGS["precision"], choices=PRECISIONS, default=d.precision,
                        help="auto: fp16 AMP on CUDA, fp32 on the CPU; bf16: CPU autocast (needs native bf16 to pay)")
    parser.add_argument(FLAGS["threads"], type=int, default=d.threads, help="CPU threads (default 0: all cores)")
    parser.add_argument(FLAGS["resume"], action="store_true", help="continue from the last checkpoint")


def config_from_args(args, scale: int = 0) -> TrainConfig:
    steps, minutes = args.steps, args.minutes
    if steps is None and minutes is None:
        minutes = 5.0
    try:
        return TrainConfig(scale=scale, steps=steps or 0, minutes=float(minutes or 0.0), lr=args.lr, batch=args.batch,
                           patch=args.patch, val_every=args.val_every, seed=args.seed, device=args.device,
                           precision=args.precision, threads=args.threads)
    except ConfigError as e:
        raise UserError(e.for_cli()) from None


def check_budget_args(args) -> None:
    if args.steps is not None and args.steps < 0:
        raise UserError(f"{flag('steps')} must be >= 0, not {args.steps}")
    if args.minutes is not None and not (math.isfinite(args.minutes) and args.minutes > 0):
        raise UserError(f"{flag('minutes')} must be a positive number, not {args.minutes}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pairs", help="pairs file made by `selftransfer pairs` (HDF5)")
    parser.add_argument("-o", "--output", required=True, help="run directory (checkpoint.pt, model.pth, result.json)")
    add_config_arguments(parser)
    parser.add_argument("--force", action="store_true", help="start over in a run directory that has a checkpoint")
    parser.add_argument("--progress", action="store_true", help="show the progress bar even when not on a terminal")


def run(args) -> int:
    check_budget_args(args)
    cfg = config_from_args(args)
    pairs = Path(args.pairs)
    if not pairs.is_file():
        raise UserError(f"{pairs}: pairs file not found" if not pairs.exists() else f"{pairs}: not a file")
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise UserError(f"-o {out}: exists and is not a directory")
    if (out / CHECKPOINT).exists() and not (args.resume or args.force):
        raise UserError(f"{out / CHECKPOINT} exists: pass {flag('resume')} to continue that run or --force to start "
                        f"over")
    result = train(pairs, out, cfg, init=args.init, resume=args.resume, progress=True if args.progress else None)
    print(json.dumps(result.validation(), indent=2))
    print(f"s/step {result.s_per_step:.3f}" if result.s_per_step else "no step timed", file=sys.stderr)
    return 0
