"""Fine-tuning loop (trainer/train.py): schedule, budgets, validation and best selection, checkpoints and exact
resume, on a tiny synthetic pairs file and on pairs made from the shared clip."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vs_selftransfer.errors import UserError
from selftransfer_trainer.train import (CHECKPOINT, MODEL, RESULT, Schedule, TrainConfig, load_checkpoint, lr_at,
                                        progress_at, replan, train)

# Small and fast: random-init CARN-M on 32x48 LR frames, patches of 16, validation in PyTorch (no ONNX export).
# One thread: on a busy 2-core machine two OpenMP threads wait on each other and tiny steps get ~5x slower.
TINY = dict(patch=16, batch=4, lr=1e-3, warmup_steps=2, threads=1, val_backend="torch", checkpoint_seconds=0)


def smooth_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A picture-like RGB uint8 image: a few random sinusoids and gradients (learnable, unlike white noise)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.zeros((h, w, 3))
    for c in range(3):
        for _ in range(4):
            fy, fx, ph = rng.uniform(0.01, 0.2), rng.uniform(0.01, 0.2), rng.uniform(0, 2 * np.pi)
            img[..., c] += np.sin(fy * y + fx * x + ph)
        img[..., c] += rng.uniform(-1, 1) * x / w
    img = (img - img.min()) / (img.max() - img.min())
    return np.round(img * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def tiny_pairs(tmp_path_factory):
    from selftransfer_trainer.keyframes import Frame, FrameSelection
    from selftransfer_trainer.pairs import write_pairs
    from vs_selftransfer.probe import VideoInfo

    rng = np.random.default_rng(0)
    info = VideoInfo(path="synthetic.mp4", width=96, height=64, fps=25.0, frames=10, duration=0.4, pix_fmt="yuv420p",
                     bit_depth=8, has_audio=False, rotation=0, vfr=False, _sha256=["0" * 64])
    train_frames = [Frame(i, i / 25, "even", smooth_image(rng, 64, 96)) for i in (0, 3, 9)]
    val_frames = [Frame(6, 6 / 25, "even", smooth_image(rng, 64, 96))]
    selection = FrameSelection(info=info, train=train_frames, val=val_frames, keyframes=[0], scene_cuts=[],
                               params={"synthetic": True})
    path = tmp_path_factory.mktemp("pairs") / "tiny.h5"
    write_pairs(path, selection, 2)
    return path


@pytest.fixture(scope="module")
def clip_pairs(tmp_path_factory, clip_path):
    """Pairs from the shared clip: 4 training frames, 1 held-out frame (validation of a 640x360 frame is the cost)."""
    from selftransfer_trainer.keyframes import select_frames
    from selftransfer_trainer.pairs import write_pairs

    path = tmp_path_factory.mktemp("pairs") / "bbb.h5"
    write_pairs(path, select_frames(clip_path, target=4, val=1, seed=0), 2)
    return path


# -- config and schedule --------------------------------------------------------------------------------------------

def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="not both"):
        TrainConfig(steps=10, minutes=1.0)
    for bad in (dict(lr=-1.0), dict(batch=0), dict(patch=4), dict(precision="fp8"), dict(device="tpu"),
                dict(betas=(0.9, 1.5)), dict(val_backend="trt"), dict(steps=1.5), dict(minutes=float("nan"))):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TrainConfig(**bad)
    with pytest.raises(ValueError, match="architecture"):
        TrainConfig(arch="edsr")


def test_config_dict_round_trip():
    cfg = TrainConfig(steps=7, lr=1e-4, betas=(0.8, 0.99), precision="bf16")
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown"):
        TrainConfig.from_dict({**cfg.to_dict(), "momentum": 0.9})


def test_schedule_warmup_then_cosine_to_zero():
    cfg = TrainConfig(steps=100, lr=1e-3, warmup_steps=10)
    sched = Schedule(s0=0, p0=0.0, horizon=100, warmup=10)
    lrs = [lr_at(s, sched, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4 * 0.5 * (1 + math.cos(0)))
    assert max(lrs) <= 1e-3
    assert all(a <= b for a, b in zip(lrs[:9], lrs[1:10]))  # warm-up rises
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # then decays
    assert lr_at(100, sched, cfg) == pytest.approx(0.0, abs=1e-12)


def test_replanned_horizon_keeps_the_learning_rate_continuous():
    cfg = TrainConfig(minutes=1.0, lr=1e-3)
    sched = Schedule(s0=0, p0=0.0, horizon=200, warmup=10)
    before = lr_at(50, sched, cfg)
    new = replan(50, sched, cfg, remaining_s=100.0, s_per_step=0.5, val_s=2.0, validated_quarters=1)
    # 3 validations left (2 s each) and 0.97 * 100 s: (97 - 6) / 0.5 = 182 more steps
    assert new.horizon == 50 + 182
    assert lr_at(50, new, cfg) == pytest.approx(before)
    assert progress_at(new.horizon, new) == 1.0


def test_every_flag_in_the_mapping_is_a_real_flag_and_errors_name_it():
    import argparse

    from selftransfer_trainer import fit
    from selftransfer_trainer.train import FLAGS, add_arguments, config_from_args, config_differences

    train_parser, fit_parser = argparse.ArgumentParser(), argparse.ArgumentParser()
    add_arguments(train_parser)
    fit.add_arguments(fit_parser)
    known = {s for p in (train_parser, fit_parser) for a in p._actions for s in a.option_strings}
    assert set(FLAGS.values()) <= known
    assert set(FLAGS) - {"init", "resume"} <= set(TrainConfig().to_dict())
    args = train_parser.parse_args(["p.h5", "-o", "run", "--batch", "0"])
    with pytest.raises(UserError, match=r"^--batch 0: must be a positive integer"):
        config_from_args(args)
    args = train_parser.parse_args(["p.h5", "-o", "run", "--val-every", "-2"])
    with pytest.raises(UserError, match=r"^--val-every -2:"):
        config_from_args(args)
    saved = TrainConfig(steps=4, lr=1e-3).to_dict()
    assert config_differences(saved, TrainConfig(steps=4, lr=5e-4)) == ["--lr: checkpoint 0.001, now 0.0005"]
    # A setting the checkpoint predates counts as its default: the run still resumes.
    del saved["grad_clip"]
    assert config_differences(saved, TrainConfig(steps=4, lr=1e-3)) == []
    assert config_differences(saved, TrainConfig(steps=4, lr=1e-3, grad_clip=0.5)) == [
        "train config grad_clip: checkpoint 1.0, now 0.5"]


def test_validation_tiles_are_exact(tiny_pairs):
    """Validation with the shared overlap scores the same whether the frames run whole or in small tiles."""
    from vs_selftransfer.model import ModelConfig, build_model
    from selftransfer_trainer.pairs import Pairs
    from selftransfer_trainer.validate import Validator

    torch.manual_seed(0)
    model = build_model(ModelConfig(scale=2, channels=8))
    with Pairs(tiny_pairs) as pairs:
        frames = [pairs.val_pair(0)]
    cfg = TrainConfig()
    scores = [Validator(frames, 2, model, torch.device("cpu"), backend="torch", tile=tile,
                        overlap=cfg.val_overlap)(model) for tile in (0, 12)]
    assert scores[0] == pytest.approx(scores[1], abs=1e-6)
    short = Validator(frames, 2, model, torch.device("cpu"), backend="torch", tile=12, overlap=2)(model)
    assert abs(short - scores[0]) > 1e-5  # too little context does show: the comparison above can fail
    assert model.training  # validation restores the mode


# -- training on synthetic pairs -------------------------------------------------------------------------------------

def test_few_steps_from_random_init_beat_it(tiny_pairs, tmp_path):
    cfg = TrainConfig(steps=8, val_every=4, **TINY)
    r = train(tiny_pairs, tmp_path, cfg, init="none", verbose=False)
    assert r.steps == 8 and len(r.losses) == 8 and all(math.isfinite(v) for v in r.losses)
    assert [h["step"] for h in r.history] == [4, 8]
    # A random network is a poor upscaler; a few Adam steps must beat it on the held-out frame.
    assert r.shipped == "selftransfer" and r.best_step in (4, 8)
    assert r.shipped_psnr_y == max(h["psnr_y"] for h in r.history) > r.generic_psnr_y
    assert r.val_frames == [6]
    assert {p.name for p in tmp_path.iterdir()} == {CHECKPOINT, MODEL, RESULT}


def test_checkpoint_and_model_load_weights_only(tiny_pairs, tmp_path):
    from vs_selftransfer.model import ModelConfig, build_model
    from selftransfer_trainer.weights import read_state_dict

    cfg = TrainConfig(steps=3, val_every=3, **TINY)
    r = train(tiny_pairs, tmp_path, cfg, init="none", verbose=False)
    ckpt = torch.load(tmp_path / CHECKPOINT, map_location="cpu", weights_only=True)
    assert ckpt["step"] == 3 and ckpt["state"]["done"]
    assert TrainConfig.from_dict(ckpt["train_config"]) == cfg
    model = build_model(ModelConfig.from_dict(ckpt["model_config"]))
    model.load_state_dict(ckpt["train_model"])  # the weights being trained...
    model.load_state_dict(ckpt["model"])  # ...and the best validated ones, what `export checkpoint.pt` ships
    assert ckpt["best"]["step"] == r.best_step
    assert all(torch.equal(v, ckpt["model"][k]) for k, v in r.model.state_dict().items())
    assert set(ckpt["optimizer"]["state"])  # Adam moments are saved
    assert set(ckpt["rng"]) == {"torch", "cuda", "numpy", "python"} and "rng" in ckpt["sampler"]
    # model.pth holds the shipped weights, readable by the weights reader (and so by `selftransfer export`).
    shipped = read_state_dict(tmp_path / MODEL)
    for k, v in r.model.state_dict().items():
        assert torch.equal(shipped[k], v)


def test_resume_continues_exactly(tiny_pairs, tmp_path):
    cfg = TrainConfig(steps=6, val_every=2, **TINY)
    whole = train(tiny_pairs, tmp_path / "whole", cfg, init="none", verbose=False)

    class Killed(Exception):
        pass

    def die_at_4(step, loss):
        if step == 4:
            raise Killed

    with pytest.raises(Killed):
        train(tiny_pairs, tmp_path / "split", cfg, init="none", verbose=False, on_step=die_at_4)
    assert load_checkpoint(tmp_path / "split" / CHECKPOINT)["step"] == 4
    resumed = train(tiny_pairs, tmp_path / "split", cfg, init="none", resume=True, verbose=False)
    assert resumed.losses == whole.losses
    assert [(h["step"], h["psnr_y"]) for h in resumed.history] == [(h["step"], h["psnr_y"]) for h in whole.history]
    for (k, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    # A finished run resumed again does nothing more.
    again = train(tiny_pairs, tmp_path / "split", cfg, init="none", resume=True, verbose=False)
    assert again.steps == 6 and again.losses == whole.losses


def test_resume_refuses_other_settings(tiny_pairs, tmp_path):
    train(tiny_pairs, tmp_path, TrainConfig(steps=2, **TINY), init="none", verbose=False)
    with pytest.raises(UserError, match="lr"):
        train(tiny_pairs, tmp_path, TrainConfig(steps=2, **dict(TINY, lr=5e-4)), init="none", resume=True,
              verbose=False)


@pytest.mark.parametrize("budget", [dict(steps=0), dict(steps=4, lr=0.0)])
def test_ships_generic_when_nothing_beats_it(tiny_pairs, tmp_path, budget):
    from selftransfer_trainer.weights import read_state_dict

    cfg = TrainConfig(**dict(TINY, val_every=2, **budget))
    torch.manual_seed(cfg.seed)
    r = train(tiny_pairs, tmp_path, cfg, init="none", verbose=False)
    assert r.shipped == "generic" and r.best_step == 0
    assert r.shipped_psnr_y == r.generic_psnr_y
    assert "shipping the generic weights" in r.message and r.validation()["shipped"] == "generic"
    if budget["steps"] == 0:
        assert r.steps == 0 and r.selftransfer_psnr_y is None and "no training step ran" in r.message
    else:  # lr 0: the weights never move, so every validation ties the generic score, which is not a win
        assert [h["psnr_y"] for h in r.history] == [r.generic_psnr_y] * 2
    # What ships is the initial (here: seeded random) network.
    from vs_selftransfer.model import ModelConfig
    from selftransfer_trainer.weights import initial_model

    torch.manual_seed(cfg.seed)
    initial = initial_model(ModelConfig(scale=2), "none").state_dict()
    shipped = read_state_dict(tmp_path / MODEL)
    assert all(torch.equal(initial[k], shipped[k]) for k in initial)


def test_minutes_budget_ends_with_a_validation(tiny_pairs, tmp_path):
    # How many steps fit depends on the machine; what must hold: at least one step, and the run ends at its
    # (estimated or time-cut) horizon with a validation of the final weights.
    cfg = TrainConfig(minutes=0.05, **TINY)
    r = train(tiny_pairs, tmp_path, cfg, init="none", verbose=False)
    assert r.steps >= 1 and r.horizon == r.steps
    assert r.history and r.history[-1]["step"] == r.steps
    assert r.shipped == ("selftransfer" if max(h["psnr_y"] for h in r.history) > r.generic_psnr_y else "generic")


def test_missing_or_foreign_files_are_user_errors(tiny_pairs, tmp_path):
    with pytest.raises(UserError, match="no such pairs file"):
        train(tmp_path / "nope.h5", tmp_path / "run", TrainConfig(steps=1, **TINY), init="none", verbose=False)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / CHECKPOINT).write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable training checkpoint"):
        train(tiny_pairs, tmp_path / "run", TrainConfig(steps=1, **TINY), init="none", resume=True, verbose=False)
    with pytest.raises(UserError, match="does not match"):
        train(tiny_pairs, tmp_path / "run2", TrainConfig(steps=1, scale=3, **TINY), init="none", verbose=False)


def test_onnx_validation_runner_matches_pytorch():
    from vs_selftransfer.model import ModelConfig, build_model
    from selftransfer_trainer.validate import OnnxRunner
    from vs_selftransfer.model import torch_runner

    torch.manual_seed(0)
    model = build_model(ModelConfig(scale=2, channels=8)).eval()
    runner = OnnxRunner(model, threads=1)
    x = np.random.default_rng(1).random((1, 3, 20, 28), dtype=np.float32)
    with torch.no_grad():  # new weights after the export are picked up by the next session
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01)
    run = runner(model)
    assert run is not None
    assert np.max(np.abs(run(x) - torch_runner(model, "cpu", channels_last=True)(x))) < 1e-4


# -- training on the shared clip -------------------------------------------------------------------------------------

def test_few_steps_on_the_shared_clip(clip_pairs, official_path, tmp_path):
    cfg = TrainConfig(steps=6, patch=24, batch=4, val_every=6, threads=1, val_backend="ort")
    r = train(clip_pairs, tmp_path, cfg, init=str(official_path), verbose=False)
    assert r.steps == 6 and len(r.history) == 1
    # The official CARN-M beats bicubic by a wide margin on real frames (validated through ONNX Runtime here).
    assert r.generic_psnr_y > r.bicubic_psnr_y + 1.0
    tuned = r.history[-1]["psnr_y"]
    assert r.shipped == ("selftransfer" if tuned > r.generic_psnr_y else "generic")
    assert r.shipped_psnr_y == max(tuned, r.generic_psnr_y)
    v = r.validation()
    assert set(v) >= {"bicubic_psnr_y", "generic_psnr_y", "selftransfer_psnr_y", "shipped", "steps", "best_step"}
