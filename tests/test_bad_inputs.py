"""Issue 6, trainer side: every bad input to ``selftransfer frames`` gets one clear error, exit status 2 and no
output file; the unusual-but-valid inputs (odd size, 10-bit, gray, VFR, rotated) work. Inputs are made from the
shared clip by tests/badinputs.py."""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest

import badinputs
from conftest import ROOT
from selftransfer_trainer.cli import main
from selftransfer_trainer.metrics import psnr
from vs_selftransfer.files import check_output_path
from vs_selftransfer.probe import probe
from selftransfer_trainer.video import read_frames

# input name -> words the one-line error must contain
REFUSED = {
    "missing": "no such file",
    "directory": "is a directory",
    "empty": "empty (0 bytes)",
    "truncated": "truncated or damaged",
    "truncated_faststart": "truncated",
    "text": "text file, not a video",
    "audio_only": "no video stream (it contains only audio)",
    "tiny": "too small to train at x2",
    "few_frames": "too few to hold out 4 validation frames",
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, clip_path):
    return badinputs.session_inputs(tmp_path_factory, clip_path)


def _frames(capsys, *argv):
    code = main(["frames", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_bad_input_is_refused_clearly(inputs, tmp_path, capsys, name):
    out = tmp_path / "frames.json"
    code, _, err = _frames(capsys, inputs[name], "-o", out)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("selftransfer frames: error: ")
    assert str(inputs[name].name) in lines[0] and REFUSED[name] in lines[0]
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_bad_input_through_the_real_command(inputs, tmp_path):
    out = tmp_path / "frames.json"
    proc = subprocess.run([sys.executable, "-m", "selftransfer_trainer.cli", "frames", str(inputs["truncated"]), "-o", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "selftransfer frames: error:" in proc.stderr
    assert "truncated" in proc.stderr and not out.exists()


def test_existing_output_needs_force(inputs, tmp_path, capsys):
    out = tmp_path / "frames.json"
    out.write_text("precious")
    code, _, err = _frames(capsys, inputs["odd"], "-o", out)
    assert code == 2 and "already exists" in err and "--force" in err
    assert out.read_text() == "precious"
    code, _, _ = _frames(capsys, inputs["odd"], "-o", out, "--force", "--target", "4", "--val", "2")
    assert code == 0 and json.loads(out.read_text())["video"]["width"] == 321


def _unwritable_folder(tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        fd, probe_file = tempfile.mkstemp(dir=folder)
    except OSError:
        return folder
    # Root ignores permission bits: use a kernel filesystem that refuses new files even to root.
    os.close(fd)
    os.unlink(probe_file)
    folder.chmod(0o755)
    try:
        fd, probe_file = tempfile.mkstemp(dir="/sys")
    except OSError:
        return "/sys"
    os.close(fd)
    os.unlink(probe_file)
    pytest.skip("found no folder this user cannot write to")


def test_unwritable_output_folder(inputs, tmp_path, capsys):
    folder = _unwritable_folder(tmp_path)
    out = os.path.join(folder, "frames.json")
    code, _, err = _frames(capsys, inputs["odd"], "-o", out)
    assert code == 2 and "cannot write in the output directory" in err and err.count("\n") == 1
    assert not os.path.exists(out)


def test_missing_output_folder_and_folder_as_output(inputs, tmp_path, capsys):
    code, _, err = _frames(capsys, inputs["odd"], "-o", tmp_path / "no" / "such" / "frames.json")
    assert code == 2 and "does not exist" in err
    code, _, err = _frames(capsys, inputs["odd"], "-o", tmp_path)
    assert code == 2 and "is a directory" in err


def test_check_output_path_leaves_nothing_behind(tmp_path):
    target = tmp_path / "model.stm"
    assert check_output_path(target, force=False) == target
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------- accepted inputs

def _json_of(capsys, tmp_path, path, *extra):
    out = tmp_path / "frames.json"
    code, _, err = _frames(capsys, path, "-o", out, *extra)
    assert code == 0, err
    return json.loads(out.read_text())


def test_odd_size_is_accepted(inputs, tmp_path, capsys):
    data = _json_of(capsys, tmp_path, inputs["odd"])
    assert (data["video"]["width"], data["video"]["height"]) == (321, 181)
    (_, _, img), = read_frames(inputs["odd"], [0])
    assert img.shape == (181, 321, 3)


def test_ten_bit_is_converted_to_8_bit_rgb(inputs, tmp_path, capsys):
    data = _json_of(capsys, tmp_path, inputs["tenbit"])
    assert data["video"]["pix_fmt"] == "yuv420p10le" and data["video"]["bit_depth"] == 10
    eight = {i: img for i, _, img in read_frames(inputs["eight"], [0, 12])}
    for i, _, img in read_frames(inputs["tenbit"], [0, 12]):
        assert img.dtype == np.uint8
        # The same samples at 10 bits: the RGB frames agree up to rounding.
        assert psnr(img / 255.0, eight[i] / 255.0) > 45


def test_gray_is_converted_to_rgb(inputs, tmp_path, capsys):
    data = _json_of(capsys, tmp_path, inputs["gray"])
    assert data["video"]["pix_fmt"] == "gray"
    (_, _, gray), = read_frames(inputs["gray"], [5])
    (_, _, color), = read_frames(inputs["eight"], [5])
    assert gray.shape == (180, 320, 3)
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 0], gray[..., 2])
    luma = color.astype(np.float64) @ np.array([0.2126, 0.7152, 0.0722])
    assert psnr(gray[..., 0] / 255.0, luma / 255.0) > 30


def test_variable_frame_rate_keeps_real_timestamps(inputs, tmp_path, capsys):
    data = _json_of(capsys, tmp_path, inputs["vfr"])
    info = probe(inputs["vfr"])
    assert info.vfr and info.frames == 17
    times = [t for _, t, _ in read_frames(inputs["vfr"])]
    # The timestamps ffprobe reports for the decoded frames (made 40 ms apart, then 80-120 ms apart).
    shown = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v", "-show_entries", "frame=pts_time",
                            "-of", "csv=p=0", str(inputs["vfr"])], capture_output=True, text=True, check=True,
                           timeout=60).stdout.split()
    assert times == pytest.approx([float(t.split(",")[0]) for t in shown], abs=1e-6)
    assert len(set(np.round(np.diff(times), 3))) >= 3
    for f in data["train"] + data["val"]:
        assert f["time"] == pytest.approx(times[f["index"]], abs=1e-6)


def test_rotated_video_is_made_upright(inputs, clip_path, tmp_path, capsys):
    data = _json_of(capsys, tmp_path, inputs["rotated"])
    assert (data["video"]["width"], data["video"]["height"], data["video"]["rotation"]) == (720, 1280, 90)
    (_, _, upright), = read_frames(inputs["rotated"], [3])
    (_, _, original), = read_frames(clip_path, [3])
    # The display matrix says 90 degrees counter-clockwise (ffmpeg's autorotate turns it the same way).
    assert np.array_equal(upright, np.rot90(original, 1))
