"""CARN and CARN-M (Ahn et al., ECCV 2018), single-scale, with parameter names that match the official
state dict (nmhkahn/CARN-pytorch), so the official weights load without renaming anything but the upsampler head.

The official checkpoint is multi-scale: one shared body and three heads ``upsample.up2/up3/up4``. We build a
single-scale network (``upsample.up``) and take the head of the requested scale: a bundle upscales by one factor.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# DIV2K mean used by the official code; part of the network, not of the data pipeline.
RGB_MEAN = (0.4488, 0.4371, 0.4040)


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the architecture; saved in every checkpoint and bundle."""

    arch: str = "carn_m"  # "carn_m" or "carn"
    scale: int = 2
    channels: int = 64
    group: int = 4  # grouped convs of CARN-M's efficient residual blocks and upsampler (1 for CARN)

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"unknown architecture {self.arch!r}; expected one of {sorted(ARCHS)}")
        if self.scale not in (2, 3, 4):
            raise ValueError(f"scale must be 2, 3 or 4, not {self.scale!r}")
        if self.channels < 1 or self.group < 1 or self.channels % self.group:
            raise ValueError(f"channels ({self.channels}) must be a positive multiple of group ({self.group})")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        check_known_keys(cls, d, "model config")
        return cls(**d)


def check_known_keys(config_class, d: dict, what: str) -> None:
    """Refuse keys a config dataclass does not have: a manifest or checkpoint from another version, or a typo."""
    unknown = set(d) - {f.name for f in dataclasses.fields(config_class)}
    if unknown:
        raise ValueError(f"unknown {what} keys: {sorted(unknown)}")


class MeanShift(nn.Module):
    def __init__(self, sign: float):
        super().__init__()
        self.shifter = nn.Conv2d(3, 3, 1)
        self.shifter.weight.data = torch.eye(3).view(3, 3, 1, 1)
        self.shifter.bias.data = sign * torch.tensor(RGB_MEAN)
        self.shifter.requires_grad_(False)

    def forward(self, x):
        return self.shifter(x)


class BasicBlock(nn.Module):
    """conv + ReLU (the 1x1 fusion convs of the cascade)."""

    def __init__(self, cin: int, cout: int, k: int = 1):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(cin, cout, k, 1, k // 2), nn.ReLU(inplace=True))

    def forward(self, x):
        return self.body(x)


class ResidualBlock(nn.Module):
    """CARN's residual block: conv3x3, ReLU, conv3x3, then ReLU(x + out)."""

    def __init__(self, ch: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(ch, ch, 3, 1, 1), nn.ReLU(inplace=True), nn.Conv2d(ch, ch, 3, 1, 1))

    def forward(self, x):
        return F.relu(self.body(x) + x)


class EResidualBlock(nn.Module):
    """CARN-M's efficient residual block: two grouped 3x3 convs and a pointwise conv."""

    def __init__(self, ch: int, group: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(ch, ch, 3, 1, 1, groups=group), nn.ReLU(inplace=True),
            nn.Conv2d(ch, ch, 3, 1, 1, groups=group), nn.ReLU(inplace=True),
            nn.Conv2d(ch, ch, 1, 1, 0),
        )

    def forward(self, x):
        return F.relu(self.body(x) + x)


class CascadingBlock(nn.Module):
    """Local cascade: three residual units, each output concatenated and fused by a 1x1 conv.

    CARN-M shares one residual unit between the three positions (``b1`` only, the official recursion);
    CARN has three (``b1``, ``b2``, ``b3``).
    """

    def __init__(self, ch: int, shared: bool, group: int):
        super().__init__()
        self.shared = shared
        if shared:
            self.b1 = EResidualBlock(ch, group)
        else:
            self.b1, self.b2, self.b3 = ResidualBlock(ch), ResidualBlock(ch), ResidualBlock(ch)
        self.c1 = BasicBlock(ch * 2, ch)
        self.c2 = BasicBlock(ch * 3, ch)
        self.c3 = BasicBlock(ch * 4, ch)

    def forward(self, x):
        units = (self.b1, self.b1, self.b1) if self.shared else (self.b1, self.b2, self.b3)
        return cascade(x, units, (self.c1, self.c2, self.c3))


def cascade(x, units, fusions):
    """The cascading mechanism shared by the blocks and the whole network: concat every earlier output."""
    c = o = x
    for unit, fuse in zip(units, fusions):
        c = torch.cat([c, unit(o)], dim=1)
        o = fuse(c)
    return o


class Upsample(nn.Module):
    """Sub-pixel upsampler: log2(scale) x (conv to 4C, ReLU, shuffle 2) for 2/4, one (conv to 9C, shuffle 3) for 3."""

    def __init__(self, ch: int, scale: int, group: int):
        super().__init__()
        layers: list[nn.Module] = []
        if scale in (2, 4):
            for _ in range(int(math.log2(scale))):
                layers += [nn.Conv2d(ch, 4 * ch, 3, 1, 1, groups=group), nn.ReLU(inplace=True), nn.PixelShuffle(2)]
        else:
            layers += [nn.Conv2d(ch, 9 * ch, 3, 1, 1, groups=group), nn.ReLU(inplace=True), nn.PixelShuffle(3)]
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        return self.body(x)


class UpsampleBlock(nn.Module):
    def __init__(self, ch: int, scale: int, group: int):
        super().__init__()
        self.up = Upsample(ch, scale, group)  # official multi-scale names: up2 / up3 / up4

    def forward(self, x):
        return self.up(x)


class CARN(nn.Module):
    """Input and output: RGB float in [0, 1], NCHW. Output is not clamped (callers clamp when they quantize)."""

    shared_units = False

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        ch = cfg.channels
        self.sub_mean = MeanShift(-1.0)
        self.add_mean = MeanShift(+1.0)
        self.entry = nn.Conv2d(3, ch, 3, 1, 1)
        self.b1 = CascadingBlock(ch, self.shared_units, cfg.group)
        self.b2 = CascadingBlock(ch, self.shared_units, cfg.group)
        self.b3 = CascadingBlock(ch, self.shared_units, cfg.group)
        self.c1 = BasicBlock(ch * 2, ch)
        self.c2 = BasicBlock(ch * 3, ch)
        self.c3 = BasicBlock(ch * 4, ch)
        self.upsample = UpsampleBlock(ch, cfg.scale, cfg.group)
        self.exit = nn.Conv2d(ch, 3, 3, 1, 1)

    def forward(self, x):
        x = self.entry(self.sub_mean(x))
        x = cascade(x, (self.b1, self.b2, self.b3), (self.c1, self.c2, self.c3))
        return self.add_mean(self.exit(self.upsample(x)))


class CARNM(CARN):
    shared_units = True


# Explicit map, no registry: the manifest's "arch" names one of these.
ARCHS = {"carn_m": CARNM, "carn": CARN}

# How far (in LR pixels) an output pixel can see: entry conv, 3 blocks x 3 units x 2 3x3 convs, the upsampler's
# 3x3 convs and the exit conv. Tiles overlapping by at least this much give the same output as the whole frame.
RECEPTIVE_RADIUS = 22


def build_model(cfg: ModelConfig) -> CARN:
    return ARCHS[cfg.arch](cfg)


def torch_runner(model, device="cpu", *, channels_last: bool | None = None, dtype: torch.dtype | None = None):
    """The one way to run a PyTorch network (an eager CARN, or a TorchScript or TensorRT module) as the ``run``
    callable of ``vs_selftransfer.tiling``: (N, 3, h, w) float32 numpy -> a new C-contiguous float32 numpy array
    (N, 3, sh, sw). Used by training validation, evaluation, the export checks and the TensorRT backend.

    The model must already be on ``device`` (and in eval mode): it is run as it is, never moved or changed, so a
    model being trained can be validated in place. ``channels_last``: feed channels-last tensors, the faster layout
    for these convolutions on the CPU (None: on the CPU only). ``dtype``: the input type the module takes
    (float16 for an fp16 TensorRT engine; default float32); the output is float32 whatever the module computes in.
    """
    device = torch.device(device)
    layout = torch.channels_last if (device.type == "cpu" if channels_last is None else channels_last) \
        else torch.contiguous_format
    dtype = dtype or torch.float32

    def run(x):
        t = torch.from_numpy(x).to(device, dtype).contiguous(memory_format=layout)
        with torch.inference_mode():
            y = model(t)
        return y.to("cpu", torch.float32).contiguous().numpy()

    return run


def official_to_single_scale(state: dict, scale: int) -> dict:
    """Map an official multi-scale state dict to our single-scale names: keep the ``upsample.up{scale}`` head."""
    prefix = f"upsample.up{scale}."
    heads = {k for k in state if k.startswith("upsample.up")}
    if heads and not any(k.startswith(prefix) for k in heads):
        if any(k.startswith("upsample.up.") for k in heads):
            return dict(state)  # already single-scale
        raise ValueError(f"checkpoint has no x{scale} upsampler head")
    out = {}
    for k, v in state.items():
        if k.startswith("upsample.up"):
            if k.startswith(prefix):
                out["upsample.up." + k[len(prefix):]] = v
            continue
        out[k.removeprefix("module.")] = v
    return out


def load_state(model: CARN, state: dict) -> CARN:
    """Load weights strictly; the error names missing/unexpected keys (a wrong arch or group fails here)."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatch, e.g. a CARN checkpoint into CARN-M
        raise ValueError(f"weights do not fit {model.cfg.arch} x{model.cfg.scale}: {str(e).splitlines()[-1].strip()}") from None
    if missing or unexpected:
        raise ValueError(
            f"weights do not fit {model.cfg.arch} x{model.cfg.scale}: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}")
    return model


# The official CARN-M weights ship inside the package (vs_selftransfer/official/, MIT licence notice beside them),
# converted from nmhkahn/CARN-pytorch's checkpoint/carn_m.pth by scripts/convert_official_weights.py: nothing is
# downloaded at run time. Both digests are pinned; the shipped file is checked before it is read.
OFFICIAL_WEIGHTS = {
    "arch": "carn_m",
    "file": "carn_m_x234.safetensors",
    "sha256": "b84a10460153b5171cc81782db7d4206e1a695aae8a39e4c88581cf9b46aca17",
    "source": "nmhkahn/CARN-pytorch checkpoint/carn_m.pth (MIT)",
    "source_sha256": "d48a759a84509351facb6b7c6d5bd6edec98b98519b8c464ee4ab44d2ba964ff",
}


def official_weights_path(check: bool = True):
    """Path of the shipped official multi-scale CARN-M weights (x2/x3/x4 heads), sha256-checked when ``check``."""
    from pathlib import Path

    from vs_selftransfer.files import sha256_file

    path = Path(__file__).resolve().parent / "official" / OFFICIAL_WEIGHTS["file"]
    if check:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: the official CARN-M weights are missing from the installed package; "
                                    f"reinstall selftransfer")
        if sha256_file(path) != OFFICIAL_WEIGHTS["sha256"]:
            raise ValueError(f"{path}: the shipped official CARN-M weights are damaged (sha256 mismatch); "
                             f"reinstall selftransfer")
    return path
