"""`selftransfer fit` end to end (trainer/fit.py): the bundle and its manifest, argument and input errors, and
SIGKILL during frame extraction, training and export, each followed by `--resume`."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT
from selftransfer_trainer.cli import main
from vs_selftransfer.bundle import Bundle

# Small everything: 4 training frames, 1 held-out frame, 24-px patches, batches of 4, one thread (two OpenMP threads
# on a busy 2-core machine wait on each other).
SMALL = ["--batch", "4", "--patch", "24", "--frames", "4", "--val-frames", "1", "--threads", "1"]


@pytest.fixture(scope="module")
def small_clip(tmp_path_factory, clip_path):
    """Two seconds of the shared clip at 320x180: the kill/resume runs cost seconds, not minutes."""
    path = tmp_path_factory.mktemp("clips") / "small.mp4"
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-nostdin", "-y", "-i", str(clip_path), "-t", "2",
                    "-vf", "scale=320:180", "-an", "-c:v", "libx264", "-preset", "ultrafast", str(path)],
                   check=True, timeout=120)
    return path


def test_fit_end_to_end_on_the_shared_clip(clip_path, official_path, tmp_path, capsys):
    from vs_selftransfer.files import sha256_file

    out = tmp_path / "bbb.stm"
    rc = main(["fit", str(clip_path), "-o", str(out), "--delivery", "--init", str(official_path), "--steps", "4",
               "--val-every", "4", *SMALL])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "validation PSNR-Y: bicubic" in printed and "shipped:" in printed
    m = Bundle.open(out).manifest
    assert m["arch"] == "carn_m" and m["scale"] == 2
    assert m["source"] == {"name": "bigbuckbunny.mp4", "sha256": sha256_file(clip_path),
                           "size": clip_path.stat().st_size, "frames": 132, "width": 1280, "height": 720,
                           "fps": pytest.approx(m["source"]["fps"])}
    train, val = m["frames"]["train"], m["frames"]["val"]
    assert len(train) == 4 and len(val) == 1 and len(m["frames"]["kinds"]["train"]) == 4
    assert not {v + d for v in val for d in (-1, 0, 1)} & set(train)  # held out: not a training frame nor a neighbour
    assert m["degradation"] == {"method": "bicubic", "scale": 2}
    assert m["setting"]["kind"] == "delivery" and m["setting"]["ships"] == m["validation"]["shipped"]
    tc = m["train_config"]
    assert tc["steps"] == 4 and tc["batch"] == 4 and tc["patch"] == 24 and tc["init"] == official_path.name
    v = m["validation"]
    assert v["frames"] == val and v["steps"] == 4
    assert v["generic_psnr_y"] > v["bicubic_psnr_y"] + 1.0
    assert v["shipped"] == ("selftransfer" if v["selftransfer_psnr_y"] > v["generic_psnr_y"] else "generic")
    assert v["shipped_psnr_y"] == max(v["selftransfer_psnr_y"], v["generic_psnr_y"])
    assert v["best_step"] == (4 if v["shipped"] == "selftransfer" else 0)
    assert set(m["timings"]) >= {"probe_s", "frames_pairs_s", "train_s", "s_per_step"}  # export_s: not yet known
    # The default fit measures bf16 on the held-out frames (where this CPU has it natively), so precision="auto"
    # can use it for this bundle; without native bf16 the record says it was not measured.
    bf16 = m["precision"]["bf16"]
    from vs_selftransfer.backend_base import native_support
    if native_support("bf16") is not None:
        assert bf16["measured"] and bf16["frames"] == len(val)
        assert bf16["accepted"] == (bf16["loss_db"] <= bf16["budget_db"])
    else:
        assert not bf16["measured"] and not bf16["accepted"] and "no native bf16" in bf16["reason"]
    # The work folder is gone and nothing else was left next to the output.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bbb.stm"]


def _fit_cmd(clip, out, official, steps):
    return [sys.executable, "-m", "selftransfer_trainer.cli", "fit", str(clip), "-o", str(out), "--init", str(official),
            "--steps", str(steps), *SMALL]


def _run_until(cmd, ready, out, timeout=300):
    """Start ``cmd``; SIGKILL it as soon as ``ready()`` is true. Meanwhile the output must never exist.
    Returns the (killed) process's stderr, or fails if it ended on its own first."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            assert not out.exists(), "the bundle appeared before the run finished"
            if ready():
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.05)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, f"the run was not killed (exit {proc.returncode}): {err.decode()}"
    return err.decode()


def test_sigkill_during_extraction_training_and_export_then_resume(small_clip, official_path, tmp_path):
    out = tmp_path / "small.stm"
    work = tmp_path / "small.work"
    ckpt = work / "run" / "checkpoint.pt"
    cmd = _fit_cmd(small_clip, out, official_path, steps=40)

    # 1. Killed while picking frames / making pairs (fit.json is written just before).
    _run_until(cmd, lambda: (work / "fit.json").exists(), out)
    assert not out.exists()

    # 2. Resumed, then killed during training, once a checkpoint past step 0 exists. A checkpoint that exists is
    #    always complete (temporary file, fsync, rename): loading it must never fail.
    def training_checkpoint():
        return ckpt.exists() and torch.load(ckpt, map_location="cpu", weights_only=True)["step"] > 0

    _run_until([*cmd, "--resume"], training_checkpoint, out)
    killed_at = torch.load(ckpt, map_location="cpu", weights_only=True)["step"]
    assert 0 < killed_at < 40 and not out.exists()

    # 3. Resumed from that step, then killed once training is over (model.pth is the last file training writes).
    err = _run_until([*cmd, "--resume"], lambda: (work / "run" / "model.pth").exists(), out)
    assert "reusing" in err and f"resuming {ckpt} at step {killed_at}/40" in err
    assert not out.exists()

    # 4. Training is finished; only the export is left.
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([*cmd, "--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "at step 40/40" in done.stderr
    m = Bundle.open(out).manifest
    assert m["validation"]["steps"] == 40 and m["train_config"]["steps"] == 40
    # No temporaries, no work folder: only the bundle.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.stm"]


def test_resume_refuses_work_for_other_settings(small_clip, official_path, tmp_path, capsys):
    out = tmp_path / "x.stm"
    work = tmp_path / "x.work"
    work.mkdir()
    (work / "fit.json").write_text(json.dumps({"format": "selftransfer-fit-work", "scale": 3}))
    rc = main(["fit", str(small_clip), "-o", str(out), "--init", str(official_path), "--steps", "2", "--resume",
               *SMALL])
    assert rc == 2 and "rerun without --resume" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("case", ["missing", "text", "directory"])
def test_bad_input_is_a_clear_error(case, official_path, tmp_path, capsys):
    video = tmp_path / "in.mp4"
    if case == "text":
        video.write_text("not a video, just text\n" * 10)
    elif case == "directory":
        video.mkdir()
    out = tmp_path / "out.stm"
    rc = main(["fit", str(video), "-o", str(out), "--init", str(official_path), "--steps", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("selftransfer fit: error: ") and str(video) in err
    assert not out.exists() and not (tmp_path / "out.work").exists()


def test_bad_arguments_fail_before_any_work(small_clip, official_path, tmp_path, capsys):
    out = tmp_path / "out.stm"
    base = ["fit", str(small_clip), "-o", str(out)]
    cases = [
        ([*base, "--init", str(official_path), "--crf", "99"], "--crf"),
        ([*base, "--init", str(official_path), "--frames", "0"], "--frames"),
        ([*base, "--init", str(official_path), "--val-frames", "0"], "--val-frames"),
        ([*base, "--init", str(official_path), "--minutes", "0"], "--minutes"),
        ([*base, "--init", str(official_path), "--lr", "-1"], "--lr"),
        ([*base, "--init", str(tmp_path / "nope.pth")], "--init"),
        (["fit", str(small_clip), "-o", str(tmp_path / "no_such_folder" / "x.stm"), "--init", str(official_path)],
         "does not exist"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "selftransfer fit: error:" in err and needle in err, (argv, err)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_force(small_clip, official_path, tmp_path, capsys):
    out = tmp_path / "out.stm"
    out.write_bytes(b"precious")
    rc = main(["fit", str(small_clip), "-o", str(out), "--init", str(official_path), "--steps", "1"])
    assert rc == 2 and "--force" in capsys.readouterr().err
    assert out.read_bytes() == b"precious"


def test_fit_int8_auto_records_the_measured_decision(small_clip, official_path, tmp_path, capsys):
    out = tmp_path / "small.stm"
    rc = main(["fit", str(small_clip), "-o", str(out), "--init", str(official_path), "--steps", "1",
               "--int8", "auto", *SMALL])
    assert rc == 0
    assert "int8: " in capsys.readouterr().out
    m = Bundle.open(out).manifest
    q = m["precision"]["int8"]
    assert q["calibration"]["frames"] >= 1 and q["budget_db"] == 0.05
    assert q["accepted"] == (q["loss_db"] <= 0.05) == ("model.int8.onnx" in m["members"])
