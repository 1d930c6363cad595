"""Where initial weights come from: the official CARN-M checkpoint (downloaded once, checksummed, cached),
a user path, or nothing (random init). Only ``torch.load(weights_only=True)``: a checkpoint never runs code."""
from __future__ import annotations

import os
import tempfile
import urllib.request
from pathlib import Path

import torch

from trainer.model import ModelConfig, build_model, load_state, official_to_single_scale
from trainer.video import sha256_file

# nmhkahn/CARN-pytorch, MIT licence: multi-scale CARN-M (x2/x3/x4 heads, group 4).
OFFICIAL = {
    "carn_m": {
        "url": "https://github.com/nmhkahn/CARN-pytorch/raw/master/checkpoint/carn_m.pth",
        "sha256": "d48a759a84509351facb6b7c6d5bd6edec98b98519b8c464ee4ab44d2ba964ff",
        "size": 1670695,
    },
}


def cache_dir() -> Path:
    base = os.environ.get("SELFTRANSFER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "selftransfer")
    return Path(base)


def official_checkpoint(arch: str = "carn_m") -> Path:
    """Path of the cached official checkpoint, downloading it (sha256-checked) when absent."""
    if arch not in OFFICIAL:
        raise ValueError(f"no official checkpoint is known for {arch!r}; pass --init PATH")
    info = OFFICIAL[arch]
    dest = cache_dir() / f"{arch}_official_x234.pth"
    if dest.is_file() and sha256_file(dest) == info["sha256"]:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(info["url"], timeout=30) as resp:
            while b := resp.read(1 << 20):
                out.write(b)
        if sha256_file(tmp) != info["sha256"]:
            raise ValueError(f"downloaded {info['url']} but its sha256 does not match the pinned one")
        os.replace(tmp, dest)
    except OSError as e:
        raise RuntimeError(
            f"could not download the official {arch} checkpoint from {info['url']} ({e}); "
            f"you seem to be offline: download it by hand and pass --init PATH") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def read_state_dict(path: str | os.PathLike) -> dict:
    """A state dict from a .pth (weights only) or .safetensors file, or a bundle's weights."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    if path.suffix == ".stm":
        from vs_selftransfer.bundle import Bundle
        return Bundle.open(path).state_dict()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError for code-carrying pickles, zip errors for garbage
        raise ValueError(f"{path} is not a weights-only PyTorch checkpoint: {e}") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # our own training checkpoints
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict")
    return state


def initial_model(cfg: ModelConfig, init: str):
    """``init``: "official", "none", or a path (.pth, .safetensors, .stm)."""
    model = build_model(cfg)
    if init == "none":
        return model
    path = official_checkpoint(cfg.arch) if init == "official" else init
    return load_state(model, official_to_single_scale(read_state_dict(path), cfg.scale))
