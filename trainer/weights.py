"""Where initial weights come from: the official CARN-M weights shipped in the package (checksummed), a user
path, or nothing (random init). Only ``torch.load(weights_only=True)``: a checkpoint never runs code."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from vs_selftransfer.model import (OFFICIAL_WEIGHTS, ModelConfig, build_model, load_state, official_to_single_scale,
                                   official_weights_path)


def official_checkpoint(arch: str = "carn_m") -> Path:
    """The official weights shipped in the package (sha256-checked); nothing is downloaded."""
    if arch != OFFICIAL_WEIGHTS["arch"]:
        raise ValueError(f"no official weights ship for {arch!r}, only for {OFFICIAL_WEIGHTS['arch']!r}; "
                         f"give a weights path instead")
    return official_weights_path()


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
