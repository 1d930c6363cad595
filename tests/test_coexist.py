"""Next to vs-mlrt: in one VapourSynth with vapoursynth-mlrt-ov and -ort installed (the `test` extra installs them),
`core.selftransfer.Upscale` run by vspipe still uses its fastest CPU backend, OpenVINO, at the precision `auto`
picks for this CPU and bundle, and its output matches our fp32 reference within that precision's budget.

vspipe creates the core, and so autoloads vs-mlrt's libopenvino, before the script runs: OpenVINO's Python module
cannot load in that process, whatever the script imports first. The script below records that, so the test shows
the conflict is live and that the filter ran anyway (in its OpenVINO worker process)."""
from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT

VSPIPE = Path(sys.executable).with_name("vspipe")
DEV_PLUGIN_DIR = ROOT / "build" / "vsplugin"
FRAMES = (20, 100)           # Big Buck Bunny frames with texture and motion
CROP = (slice(0, 180), slice(160, 480))  # a 320x180 LR crop of each 640x360 LR frame: quick, still real footage

SCRIPT = r'''
import json, os, sys
import numpy as np
import vapoursynth as vs

core = vs.core
report = {"vs_mlrt_ov_loaded": hasattr(core, "ov"), "vs_mlrt_ort_loaded": hasattr(core, "ort")}
try:
    import openvino  # what a user's script would try: fails while vs-mlrt's libopenvino is loaded
    report["openvino_imports_here"] = True
except ImportError as e:
    report["openvino_imports_here"] = False
    report["openvino_import_error"] = str(e)

lr = np.load(os.environ["ST_LR"])
n, _, h, w = lr.shape
base = core.std.BlankClip(width=w, height=h, format=vs.RGBS, length=n, keep=True)


def fill(n, f):
    out = f.copy()
    for p in range(3):
        np.asarray(out[p])[:] = lr[n][p]
    return out


src = core.std.ModifyFrame(base, base, fill)
clips = []
for precision in ("auto", "fp32"):  # auto: the default; fp32: the engine's exactness through the same path
    clips.append(core.selftransfer.Upscale(src, model=os.environ["ST_MODEL"], precision=precision))
    report[precision] = dict(core.selftransfer.Version())
json.dump(report, open(os.environ["ST_REPORT"], "w"), default=str)
core.std.StackVertical(clips).set_output()
'''


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.fixture(scope="module")
def footage(clip_path):
    """(LR (n, 3, h, w) float32, HR (n, 3, 2h, 2w) float64) crops of real frames, and the val pairs for fit's gate."""
    from selftransfer_trainer.degrade import degrade
    from selftransfer_trainer.video import read_frames

    lrs, hrs = [], []
    for _, _, rgb in read_frames(str(clip_path), list(FRAMES)):
        lr = degrade(rgb, 2)[CROP]
        hr = rgb[CROP[0].start * 2:CROP[0].stop * 2, CROP[1].start * 2:CROP[1].stop * 2]
        lrs.append(lr)
        hrs.append(hr)
    return lrs, hrs


@pytest.fixture(scope="module")
def measured_bundle(tmp_path_factory, official_path, footage):
    """The official CARN-M x2 exported the way fit exports it: bf16 measured on held-out frames of the video."""
    from selftransfer_trainer.export import export_bundle
    from selftransfer_trainer.weights import initial_model
    from vs_selftransfer.model import ModelConfig

    lrs, hrs = footage
    path = tmp_path_factory.mktemp("coexist") / "measured_x2.stm"
    export_bundle(initial_model(ModelConfig(scale=2), str(official_path)), path, torchscript=False, tensorrt=False,
                  val=list(zip(lrs, hrs)))
    return path


def run_vspipe(tmp_path: Path, model: Path, lr: np.ndarray) -> tuple[dict, np.ndarray]:
    script, report, lr_file, raw = (tmp_path / n for n in ("coexist.vpy", "report.json", "lr.npy", "out.raw"))
    script.write_text(SCRIPT)
    np.save(lr_file, lr)
    env = dict(os.environ, ST_LR=str(lr_file), ST_MODEL=str(model), ST_REPORT=str(report))
    if DEV_PLUGIN_DIR.joinpath("libselftransfer.so").exists():
        env["VAPOURSYNTH_EXTRA_PLUGIN_PATH"] = str(DEV_PLUGIN_DIR)
    done = subprocess.run([str(VSPIPE), str(script), str(raw)], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    n, _, h, w = lr.shape
    # vspipe writes each RGBS frame as its three float32 planes in G, B, R order (ffmpeg's gbrpf32); the frame is
    # both variants stacked vertically.
    out = np.fromfile(raw, np.float32).reshape(n, 3, 2, 2 * h, 2 * w)[:, [2, 0, 1]]
    return json.loads(report.read_text()), out


def test_upscale_runs_its_fastest_backend_next_to_vs_mlrt(tmp_path, measured_bundle, footage):
    if not (_installed("vapoursynth-mlrt-ov") and _installed("vapoursynth-mlrt-ort")):
        pytest.skip("vs-mlrt is not installed: pip install '.[test]' installs vapoursynth-mlrt-ov and -ort")
    if not VSPIPE.exists():
        pytest.skip(f"vspipe not found next to {sys.executable}")
    from selftransfer_trainer.metrics import psnr_y, quantize
    from vs_selftransfer import runtime
    from vs_selftransfer.bundle import Bundle

    lrs, hrs = footage
    lr = np.stack([x.transpose(2, 0, 1) for x in lrs]).astype(np.float32) / 255.0
    report, out = run_vspipe(tmp_path, measured_bundle, lr)

    assert report["vs_mlrt_ov_loaded"] and report["vs_mlrt_ort_loaded"]
    bundle = Bundle.open(measured_bundle)
    expected_precision, _ = runtime.precision_choice(bundle, "ov", "cpu")
    auto = report["auto"]
    # The fastest CPU backend ran, where the conflict is live in its worker process.
    assert auto["last_upscale"].startswith(f"ov {expected_precision} on cpu"), auto["last_upscale"]
    assert auto["last_upscale_backend"].startswith("ov: OpenVINO")
    if not report["openvino_imports_here"]:
        assert "mismatches with OpenVINO Runtime library version" in report["openvino_import_error"]
        assert "worker process" in auto["last_upscale"], auto["last_upscale"]
    assert report["fp32"]["last_upscale"].startswith("ov fp32 on cpu")

    # Our fp32 reference: ONNX Runtime in this process, whole frames.
    reference = np.empty_like(out[:, :, 0])
    upscaler = runtime.create(str(measured_bundle), backend="ort", precision="fp32", width=lr.shape[3],
                              height=lr.shape[2])
    for i in range(len(lr)):
        upscaler.process(0, i, list(lr[i]), list(reference[i]))
    reference = np.clip(reference, 0, 1)  # the filter's output range
    auto_out, fp32_out = out[:, :, 0], out[:, :, 1]
    assert np.abs(fp32_out - reference).max() < 1e-4  # the worker computes exactly what the engine does here

    def psnr(images):
        return float(np.mean([psnr_y(quantize(sr), hr.transpose(2, 0, 1) / 255.0, 2) for sr, hr in zip(images, hrs)]))

    loss = psnr(reference) - psnr(auto_out)
    if expected_precision == "fp32":
        assert np.abs(auto_out - reference).max() < 1e-4
    else:
        budget = bundle.manifest["precision"][expected_precision]["budget_db"]
        assert np.abs(auto_out - reference).max() > 0  # really the lower precision
        assert loss <= budget, f"{expected_precision} lost {loss:.4f} dB (budget {budget})"
