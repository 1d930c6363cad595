"""No command that writes may destroy one of its own inputs: an output that is an input (the same path, a symlink to
it, a hard link to it, or for ``eval`` a report directory holding it) is refused before any work, ``--force`` or
not, with an error naming the output flag, and the input keeps every byte."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from selftransfer_trainer.cli import main
from vs_selftransfer.errors import UserError
from vs_selftransfer.files import check_not_an_input, check_output_path

pytestmark = pytest.mark.skipif(not shutil.which("ffmpeg"), reason="ffmpeg is needed (apt install ffmpeg)")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def inputs(tmp_path, clip_path, tiny_bundle) -> dict[str, Path]:
    """A short 320x180 clip, a bundle, a frames file and a reference video, all in a fresh folder of their own."""
    folder = tmp_path / "in"
    folder.mkdir()
    video = folder / "video.mp4"
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", str(clip_path), "-frames:v", "12", "-vf",
                    "scale=320:180", "-c:v", "libx264", "-preset", "veryfast", "-an", str(video)], check=True)
    model = folder / "model.stm"
    shutil.copy(tiny_bundle, model)
    frames = folder / "frames.json"
    frames.write_text(json.dumps({"note": "a frames file (never read: the output check comes first)"}))
    reference = folder / "reference.mp4"
    shutil.copy(video, reference)
    return {"video": video, "model": model, "frames": frames, "reference": reference}


def aliases(target: Path, folder: Path, suffix: str) -> dict[str, Path]:
    """Three outputs that are ``target``: its own path, a symlink to it and a hard link to it."""
    symlink, hardlink = folder / f"symlink{suffix}", folder / f"hardlink{suffix}"
    for p in (symlink, hardlink):
        if os.path.lexists(p):
            p.unlink()
    symlink.symlink_to(target)
    os.link(target, hardlink)
    return {"same path": target, "symlink": symlink, "hard link": hardlink}


def refused(capsys, argv: list, flag: str, inputs: dict[str, Path]) -> None:
    before = {name: digest(p) for name, p in inputs.items()}
    assert main([str(a) for a in argv]) == 2, argv
    err = capsys.readouterr().err
    command = argv[0]
    assert err.startswith(f"selftransfer {command}: error: {flag} ") and err.count("\n") == 1, (argv, err)
    assert "is the input" in err or "holds the input" in err, (argv, err)
    assert "--force or not" in err, (argv, err)
    assert {name: digest(p) for name, p in inputs.items()} == before, argv


def test_upscale_refuses_its_video_or_model_as_output(inputs, tmp_path, capsys):
    work = tmp_path / "work"
    work.mkdir()
    video, model = inputs["video"], inputs["model"]
    for how, out in aliases(video, work, ".mp4").items():
        refused(capsys, ["upscale", video, "-o", out, "--model", model, "--force"], "--output", inputs)
    model_as_mkv = work / "model.mkv"
    model_as_mkv.symlink_to(model)
    refused(capsys, ["upscale", video, "-o", model_as_mkv, "--model", model, "--force"], "--output", inputs)


def test_script_refuses_its_video_or_model_as_output(inputs, tmp_path, capsys):
    video, model = inputs["video"], inputs["model"]
    for target in (video, model):
        for how, out in aliases(target, tmp_path, target.suffix).items():
            refused(capsys, ["script", video, "--model", model, "-o", out, "--force"], "--output", inputs)


def test_fit_refuses_its_video_or_initial_weights_as_output(inputs, tmp_path, capsys):
    video, weights = inputs["video"], inputs["model"]
    for target in (video, weights):
        for how, out in aliases(target, tmp_path, target.suffix).items():
            refused(capsys, ["fit", video, "-o", out, "--init", weights, "--force"], "--output", inputs)
    assert not list(tmp_path.glob("*.work"))  # refused before the work folder is made


def test_eval_refuses_an_input_as_report_or_inside_the_report_it_replaces(inputs, tmp_path, capsys):
    video, model, reference = inputs["video"], inputs["model"], inputs["reference"]
    for target in (video, model):
        for how, out in aliases(target, tmp_path, target.suffix).items():
            refused(capsys, ["eval", video, "--model", model, "-o", out, "--force"], "-o", inputs)
    for how, out in aliases(reference, tmp_path, reference.suffix).items():
        refused(capsys, ["eval", video, "--model", model, "--reference", reference, "-o", out, "--force"], "-o",
                inputs)
    # An earlier report folder that now holds the model: --force would replace the folder and the model with it.
    report = tmp_path / "report"
    report.mkdir()
    (report / "report.json").write_text("{}")
    kept = report / "model.stm"
    shutil.copy(model, kept)
    refused(capsys, ["eval", video, "--model", kept, "-o", report, "--force"], "-o", {**inputs, "kept": kept})
    linked_report = tmp_path / "linked_report"
    linked_report.symlink_to(report)
    refused(capsys, ["eval", video, "--model", kept, "-o", linked_report, "--force"], "-o", {**inputs, "kept": kept})
    assert (report / "report.json").read_text() == "{}"


def test_export_refuses_its_checkpoint_as_output(inputs, tmp_path, capsys):
    model = inputs["model"]
    for how, out in aliases(model, tmp_path, ".stm").items():
        refused(capsys, ["export", model, "-o", out, "--force"], "--output", inputs)


def test_pairs_and_frames_refuse_their_inputs_as_output(inputs, tmp_path, capsys):
    video, frames = inputs["video"], inputs["frames"]
    for target in (video, frames):
        for how, out in aliases(target, tmp_path, target.suffix).items():
            refused(capsys, ["pairs", video, "--frames", frames, "-o", out, "--force"], "--output", inputs)
    for how, out in aliases(video, tmp_path, video.suffix).items():
        refused(capsys, ["frames", video, "-o", out, "--force"], "--output", inputs)


def test_check_not_an_input_names_the_link_and_skips_what_is_not_there(tmp_path):
    source = tmp_path / "source.mkv"
    source.write_bytes(b"video")
    links = aliases(source, tmp_path, ".mkv")
    for how, out in links.items():
        with pytest.raises(UserError) as e:
            check_output_path(out, force=True, inputs=[None, tmp_path / "missing.mkv", source], flag="-o")
        message = str(e.value)
        assert message.startswith(f"-o {out}: is the input {source}")
        assert ("symlink" in message) == (how == "symlink") and ("hard link" in message) == (how == "hard link")
    other = tmp_path / "other.mkv"
    other.write_bytes(b"another video")
    assert check_output_path(other, force=True, inputs=[source]) == other  # an existing non-input: --force is enough
    assert check_output_path(tmp_path / "new.mkv", inputs=[source]) == tmp_path / "new.mkv"
    # A folder output is refused when it holds an input; one beside the input is fine.
    check_not_an_input(tmp_path / "sub", [source])
    with pytest.raises(UserError, match="holds the input"):
        check_not_an_input(tmp_path, [source])
    assert source.read_bytes() == b"video"


def test_demo_checks_its_output_folder_and_budget_before_any_work(tmp_path, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    assert main(["demo", "-o", str(a_file), "--quick"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"selftransfer demo: error: --output {a_file}: exists and is not a directory"), err
    assert main(["demo", "-o", str(tmp_path / "demo"), "--minutes", "0"]) == 2
    assert "--minutes must be positive" in capsys.readouterr().err
    assert a_file.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
