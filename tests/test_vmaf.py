"""VMAF (vmaf_v0.6.1 through vmaf-torch) on real Big Buck Bunny frames, and in `selftransfer eval` reports.

The quality tests use 1280x720 frames of the shared clip; the eval tests a 6-frame source/reference pair cut from
it, so that the motion feature's neighbours (frames that are not tested) are decoded from the reference file."""
import json
from fractions import Fraction

import numpy as np
import pytest

from selftransfer_trainer.cli import main
from selftransfer_trainer.vmaf import MODEL, PACKAGE, VmafScorer, luma, luma_u8

FRAME = 40  # a 1280x720 frame with detail (grass, trees) and motion around it


@pytest.fixture(scope="module")
def bbb(clip_path):
    """Frames FRAME-2 .. FRAME+2 of the clip, RGB uint8 HWC."""
    from selftransfer_trainer.video import read_frames

    return {i: rgb for i, _, rgb in read_frames(clip_path, range(FRAME - 2, FRAME + 3))}


@pytest.fixture(scope="module")
def scorer():
    import torch

    torch.set_num_threads(2)
    with VmafScorer("cpu", workers=2) as s:
        yield s


@pytest.fixture(scope="module")
def upscales(bbb, official_path):
    """The frame downscaled x2 (MATLAB antialiased bicubic), then upscaled by bicubic and by generic CARN-M."""
    import torch

    from selftransfer_trainer.degrade import imresize
    from selftransfer_trainer.metrics import quantize
    from selftransfer_trainer.weights import initial_model
    from vs_selftransfer.model import ModelConfig, torch_runner
    from vs_selftransfer.tiling import upscale_image

    lr = imresize(bbb[FRAME], 0.5)
    run = torch_runner(initial_model(ModelConfig(scale=2), str(official_path)).eval(), "cpu")
    with torch.inference_mode():
        sr = upscale_image(run, np.ascontiguousarray(np.moveaxis(lr, -1, 0), np.float32) / 255, 2, 0, 24)
    return {"bicubic": luma_u8(imresize(lr, 2)), "generic": luma(quantize(sr))}


def _motion(scorer, bbb):
    return scorer.motion2(luma_u8(bbb[FRAME - 1]), luma_u8(bbb[FRAME]), luma_u8(bbb[FRAME + 1]))


def test_identical_frames_score_far_above_upscales_and_carn_above_bicubic(bbb, scorer, upscales):
    y = luma_u8(bbb[FRAME])
    identical, bicubic, generic = scorer.scores(y, [y, upscales["bicubic"], upscales["generic"]], _motion(scorer, bbb))
    assert identical == pytest.approx(100.0, abs=0.5)  # the model's top score (libvmaf clips to [0, 100])
    assert bicubic < identical - 5
    # CARN-M restores detail bicubic cannot (+3.9 dB Y-PSNR on this clip): VMAF sees it too.
    assert generic > bicubic + 4


def test_heavy_blur_scores_lower_than_mild_blur(bbb, scorer):
    import cv2

    y = luma_u8(bbb[FRAME])
    mild, heavy = scorer.scores(y, [luma_u8(cv2.GaussianBlur(bbb[FRAME], (0, 0), s)) for s in (0.7, 2.5)],
                                _motion(scorer, bbb))
    assert 60 < mild < 99 and heavy < mild - 30


def test_motion2_of_a_static_frame_is_zero_and_of_real_neighbours_positive(bbb, scorer):
    import torch
    from vmaf_torch import VMAF

    y = luma_u8(bbb[FRAME])
    assert scorer.motion2(y, y, y) == 0.0
    assert scorer.motion2(None, y, luma_u8(bbb[FRAME + 1])) == 0.0  # the video's first frame
    moving = _motion(scorer, bbb)
    assert moving > 0.5
    # From its two neighbours, a frame's motion2 is what the package gives it inside the contiguous video.
    run = torch.from_numpy(np.stack([luma_u8(bbb[i]) for i in sorted(bbb)]))[:, None]
    with torch.inference_mode():
        whole = VMAF().compute_motion2(run)[:, 0].numpy()
    assert moving == pytest.approx(float(whole[FRAME - min(bbb)]), rel=1e-5)
    # The video's last frame: the difference to its previous frame.
    last = scorer.motion2(luma_u8(bbb[FRAME - 1]), y, None)
    assert last > 0 and moving <= last + 1e-6


def _write(path, frames, rate=25):
    from selftransfer_trainer.experiment import _Writer

    w = _Writer(path, frames[0].shape[1], frames[0].shape[0], Fraction(rate), None, True)
    for i, f in enumerate(frames):
        w.write(f, i)
    w.close()


@pytest.fixture(scope="module")
def short_pair(tmp_path_factory, clip_path):
    """(source, reference, reference frames): the clip's first 6 frames (their central 640x360, which keeps the
    networks cheap), lossless, and the same x2 smaller."""
    from selftransfer_trainer.degrade import imresize
    from selftransfer_trainer.video import read_frames

    d = tmp_path_factory.mktemp("pair")
    hr = [np.ascontiguousarray(rgb[180:540, 320:960]) for _, _, rgb in read_frames(clip_path, range(6))]
    _write(d / "ref.mkv", hr)
    _write(d / "src.mkv", [imresize(f, 0.5) for f in hr])
    return d / "src.mkv", d / "ref.mkv", hr


def _eval(source, reference, model, out, *extra):
    from conftest import OFFICIAL

    return main(["eval", str(source), "--model", str(model), "--reference", str(reference), "-o", str(out),
                 "--generic", str(OFFICIAL), "--no-deployed", "--no-progress", "--threads", "2", *extra])


def test_eval_reference_scores_vmaf_for_every_method_and_frame(short_pair, tiny_bundle, tmp_path):
    import torch
    from vmaf_torch import VMAF

    from selftransfer_trainer.degrade import imresize
    from selftransfer_trainer.video import read_frames

    source, reference, hr = short_pair
    out = tmp_path / "rep"
    assert _eval(source, reference, tiny_bundle, out, "--frames", "2") == 0
    r = json.loads((out / "report.json").read_text())
    assert r["vmaf"]["status"] == "ok" and r["vmaf"]["package"] == PACKAGE and r["vmaf"]["model"] == MODEL
    assert r["vmaf"]["version"] and r["vmaf"]["timing"]["frame_size"] == [640, 360]
    methods = r["protocol"]["methods"]
    tested = [f["index"] for f in r["frames"]]
    assert len(tested) == 2 and tested[1] == tested[0] + 1  # one consecutive pair: its outer neighbours are untested
    for f in r["frames"]:
        for m in methods:
            assert 0 <= f["metrics"][m]["vmaf"] <= 100
        assert f["metrics"]["generic"]["vmaf"] > f["metrics"]["bicubic"]["vmaf"]
        assert f["gain_vmaf"] == f["metrics"]["selftransfer"]["vmaf"] - f["metrics"]["generic"]["vmaf"]
    s = r["summary"]["all"]
    for m in methods:
        assert s["methods"][m]["vmaf"]["n"] == 2
    for m in ("bicubic", "selftransfer"):  # the tiny random network is far below generic CARN-M too
        g = s["gain_over_generic"][m]
        assert g["vmaf_mean"] < 0 and g["vmaf_frames_worse"] == 2 and g["vmaf_min"] <= g["vmaf_mean"] <= g["vmaf_max"]
        assert g["vmaf_mean"] == pytest.approx(np.mean([f["metrics"][m]["vmaf"] - f["metrics"]["generic"]["vmaf"]
                                                        for f in r["frames"]]))
    # The report's scores are those of the package's own whole-video VMAF on the contiguous reference frames:
    # the motion feature came from the true neighbours in the reference file, ADM and VIF from frame i alone.
    lo, hi = max(0, tested[0] - 1), min(len(hr) - 1, tested[1] + 1)
    ref_run = np.stack([luma_u8(hr[i]) for i in range(lo, hi + 1)])
    lr = {i: rgb for i, _, rgb in read_frames(source, range(lo, hi + 1))}
    bic_run = np.stack([luma_u8(imresize(lr[i], 2)) for i in range(lo, hi + 1)])
    torch.set_num_threads(2)
    with torch.inference_mode():
        whole = VMAF(clip_score=True).eval()(torch.from_numpy(ref_run)[:, None], torch.from_numpy(bic_run)[:, None])
    for f in r["frames"]:
        # Up to float32 rounding: PyTorch's filters sum in another order for a batch of frames than for one.
        assert f["metrics"]["bicubic"]["vmaf"] == pytest.approx(float(whole[f["index"] - lo, 0]), abs=0.01)
    md = (out / "report.md").read_text()
    assert "VMAF mean" in md and "generic CARN-M VMAF" in md and f"{MODEL} through {PACKAGE}" in md


def test_no_vmaf_leaves_it_out_and_says_so(short_pair, tiny_bundle, tmp_path, capsys):
    source, reference, _ = short_pair
    out = tmp_path / "rep"
    assert _eval(source, reference, tiny_bundle, out, "--frames", "1", "--no-vmaf") == 0
    r = json.loads((out / "report.json").read_text())
    assert r["vmaf"] == {"status": "skipped", "reason": "--no-vmaf"}
    f = r["frames"][0]
    assert "gain_vmaf" not in f and "vmaf_motion2" not in f
    assert all("vmaf" not in f["metrics"][m] for m in r["protocol"]["methods"])
    assert all("vmaf" not in st for st in r["summary"]["all"]["methods"].values())
    assert "vmaf_mean" not in r["summary"]["all"]["gain_over_generic"]["selftransfer"]
    assert "VMAF: not computed (--no-vmaf)" in (out / "report.md").read_text()
    assert "VMAF: not computed (--no-vmaf)" in capsys.readouterr().out


def test_missing_package_is_an_error_naming_it(short_pair, tiny_bundle, clip_path, tmp_path, monkeypatch, capsys):
    import sys

    source, reference, _ = short_pair
    monkeypatch.setitem(sys.modules, "vmaf_torch", None)  # `import vmaf_torch` now raises ImportError
    out = tmp_path / "rep"
    assert _eval(source, reference, tiny_bundle, out) == 2
    err = capsys.readouterr().err
    assert "selftransfer eval: error: VMAF needs" in err and PACKAGE in err and "--no-vmaf" in err
    assert not out.exists() and not list(tmp_path.iterdir())
    # experiment checks it before writing a source or fitting.
    assert main(["experiment", str(clip_path), "-o", str(tmp_path / "exp"), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "selftransfer experiment: error: VMAF needs" in err and PACKAGE in err
    assert not (tmp_path / "exp").exists()
