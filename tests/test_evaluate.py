"""``selftransfer eval``: the frame split (no training or validation frame is ever tested), the sampling, the
statistics, the report schema and plots, and an end-to-end run on the shared clip."""
import json
import math

import pytest

from vs_selftransfer.errors import UserError
from selftransfer_trainer.evaluation.evaluate import (FAR, NEAR, frame_indices, sample_frames, split_frames, summarize, verdict)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# -- frame split ----------------------------------------------------------------------------------------------
def test_split_excludes_training_and_validation_frames():
    train, val = [10, 50], [30, 31]
    frames = split_frames(100, 10.0, train, val)
    indices = {f.index for f in frames}
    assert indices.isdisjoint(train) and indices.isdisjoint(val)
    assert indices == set(range(100)) - set(train) - set(val)
    with_val = split_frames(100, 10.0, train, val, include_val=True)
    assert {f.index for f in with_val} == set(range(100)) - set(train)
    assert {f.index for f in with_val if f.is_val} == set(val)


def test_split_near_and_far_by_distance_in_seconds():
    frames = {f.index: f for f in split_frames(100, 10.0, [10, 50], [])}
    # 10 fps: "near" = within 1 s = 10 frames of a training frame, inclusive.
    assert frames[0].subset == NEAR and frames[0].distance == pytest.approx(1.0)
    assert frames[20].subset == NEAR and frames[21].subset == FAR
    assert frames[29].subset == FAR and frames[30].subset == FAR and frames[40].subset == NEAR
    assert frames[61].subset == FAR and frames[99].distance == pytest.approx(4.9)
    assert {i for i, f in frames.items() if f.subset == NEAR} == set(range(0, 21)) - {10} | set(range(40, 61)) - {50}
    # A longer near window makes everything near.
    assert all(f.subset == NEAR for f in split_frames(100, 10.0, [10, 50], [], near_seconds=5.0))
    # No known training frame: everything is unseen and far.
    assert all(f.subset == FAR and math.isinf(f.distance) for f in split_frames(5, 25.0, [], []))


def test_split_rejects_bad_arguments():
    with pytest.raises(ValueError, match="fps"):
        split_frames(10, 0.0, [], [])
    with pytest.raises(ValueError, match="n_frames"):
        split_frames(0, 25.0, [], [])


def test_frame_indices_from_manifest():
    assert frame_indices([5, 1, 5], "train", 10) == [1, 5]
    assert frame_indices([{"index": 3, "time": 0.1}, {"index": 0}], "train", 10) == [0, 3]
    assert frame_indices(None, "val", 10) == []
    with pytest.raises(UserError, match="has 10 frames"):
        frame_indices([12], "train", 10)
    with pytest.raises(UserError, match="not a frame index"):
        frame_indices(["7"], "train", 10)
    with pytest.raises(UserError, match="must be a list"):
        frame_indices({"0": 1}, "train", 10)


# -- sampling -------------------------------------------------------------------------------------------------
def _candidates():
    # 300 frames at 25 fps, training frames in the first half only: the second half is far.
    return split_frames(300, 25.0, list(range(0, 150, 15)), [37, 112])


@pytest.mark.parametrize("count", [1, 2, 5, 12, 24])
def test_sample_takes_consecutive_pairs_and_far_frames(count):
    cands = _candidates()
    picked = sample_frames(cands, count=count, seed=3)
    idx = [f.index for f in picked]
    assert idx == sorted(set(idx)) and len(idx) == count
    assert set(idx) <= {c.index for c in cands}
    if count >= 2:
        pairs = sum(1 for a, b in zip(idx, idx[1:]) if b == a + 1)
        assert pairs >= count // 2
        assert any(f.subset == FAR for f in picked)  # far frames exist: at least a third of the pairs
    if count >= 4:
        assert any(f.subset == NEAR for f in picked)
    # Spread over the video, not bunched at the start.
    if count >= 12:
        assert max(idx) > 200 and min(idx) < 100


def test_sample_is_deterministic_for_a_seed():
    cands = _candidates()
    a = [f.index for f in sample_frames(cands, count=10, seed=1)]
    assert a == [f.index for f in sample_frames(cands, count=10, seed=1)]
    assert a != [f.index for f in sample_frames(cands, count=10, seed=2)]


def test_sample_every_and_all():
    cands = _candidates()
    every = [f.index for f in sample_frames(cands, count=None, every=50)]
    assert every == [50, 51, 100, 101, 150, 151, 200, 201, 250, 251]  # 0 is a training frame
    assert sample_frames(cands, all_frames=True) == cands
    assert sample_frames(cands, count=10_000) == cands


def test_sample_without_consecutive_candidates_takes_single_frames():
    # Every other frame is a training frame: no pair exists, flicker cannot be measured, frames still spread.
    cands = split_frames(40, 25.0, list(range(0, 40, 2)), [])
    idx = [f.index for f in sample_frames(cands, count=4, seed=0)]
    assert len(idx) == 4 and all(i % 2 == 1 for i in idx)


# -- statistics -----------------------------------------------------------------------------------------------
def _frame(index, subset, psnr):
    return {"index": index, "subset": subset,
            "metrics": {m: {"psnr_y": v, "ssim_y": v / 100, "psnr_rgb": v - 1} for m, v in psnr.items()},
            "gain_psnr_y": psnr["selftransfer"] - psnr["generic"]}


def test_summary_statistics_by_hand():
    methods = ["bicubic", "generic", "selftransfer"]
    frames = [_frame(1, NEAR, {"bicubic": 30.0, "generic": 32.0, "selftransfer": 33.0}),
              _frame(2, NEAR, {"bicubic": 28.0, "generic": 31.0, "selftransfer": 31.5}),
              _frame(9, FAR, {"bicubic": 27.0, "generic": 30.0, "selftransfer": 29.8})]
    pairs = [{"index": 2, "subset": NEAR, "flicker": {"bicubic": 2.0, "generic": 1.5, "selftransfer": 1.0}}]
    s = summarize(frames, pairs, methods)
    st = s["all"]["methods"]["selftransfer"]["psnr_y"]
    assert st["mean"] == pytest.approx((33 + 31.5 + 29.8) / 3) and st["median"] == pytest.approx(31.5)
    assert st["worst"] == 29.8 and st["worst_frame"] == 9 and st["n"] == 3
    g = s["all"]["gain_over_generic"]["selftransfer"]
    assert g["psnr_y_mean"] == pytest.approx((1.0 + 0.5 - 0.2) / 3)
    assert g["frames_better"] == 2 and g["frames_worse"] == 1
    assert g["flicker_mean_change"] == pytest.approx(-0.5)
    assert s["near"]["gain_over_generic"]["selftransfer"]["psnr_y_mean"] == pytest.approx(0.75)
    assert s["far"]["gain_over_generic"]["selftransfer"]["psnr_y_mean"] == pytest.approx(-0.2)
    assert s["far"]["methods"]["generic"]["flicker"]["n"] == 0
    assert s["all"]["methods"]["bicubic"]["flicker"]["worst"] == 2.0
    assert "generic" not in s["all"]["gain_over_generic"]
    v = verdict(s)
    assert v["selftransfer_beats_generic"] and v["gain_psnr_y_mean_far"] == pytest.approx(-0.2)
    # An identical frame has an infinite PSNR: counted, kept out of the mean, and it is nobody's worst frame.
    frames.append(_frame(11, FAR, {"bicubic": 27.0, "generic": math.inf, "selftransfer": math.inf}))
    st = summarize(frames, pairs, methods)["all"]["methods"]["generic"]["psnr_y"]
    assert st["n_infinite"] == 1 and st["mean"] == pytest.approx(31.0) and st["worst"] == 30.0


# -- end to end on the shared clip ----------------------------------------------------------------------------
TRAIN = list(range(0, 61, 10))  # 0..60: frames after 85 are more than 1 s (25 frames) away: far
VAL = [75, 120]


@pytest.fixture(scope="module")
def bundle_path(tmp_path_factory, clip_path, official_path):
    import torch

    from selftransfer_trainer.export import export_bundle
    from vs_selftransfer.model import ModelConfig
    from selftransfer_trainer.weights import initial_model
    from vs_selftransfer.files import sha256_file

    torch.set_num_threads(2)
    # x4 keeps the test cheap (a 320x180 LR frame); the pipeline does not depend on the scale.
    model = initial_model(ModelConfig(scale=4), str(official_path)).eval()
    path = tmp_path_factory.mktemp("bundle") / "official_x4.stm"
    export_bundle(model, path, torchscript=False, tensorrt=False, extra={
        "source": {"path": str(clip_path), "sha256": sha256_file(clip_path)},
        "frames": {"train": TRAIN, "val": VAL}, "degradation": {"method": "bicubic"}})
    return path


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory, clip_path, official_path, bundle_path):
    from selftransfer_trainer.cli import main

    out = tmp_path_factory.mktemp("eval") / "report"
    rc = main(["eval", str(clip_path), "--model", str(bundle_path), "-o", str(out), "--frames", "4",
               "--generic", str(official_path), "--threads", "2", "--no-progress"])
    assert rc == 0
    return out


def _check_schema(r: dict) -> None:
    top = {"schema": str, "schema_version": int, "created": str, "selftransfer_version": str, "elapsed_s": float,
           "video": dict, "model": dict, "generic": dict, "protocol": dict, "frames": list, "flicker_pairs": list,
           "summary": dict, "deployed": dict, "vmaf": dict, "timing_s_per_frame": dict, "warnings": list,
           "verdict": dict,
           "plots": dict}
    for key, typ in top.items():
        assert isinstance(r[key], typ), key
    assert r["schema"] == "selftransfer-eval" and r["schema_version"] == 1
    for key in ("path", "sha256", "width", "height", "fps", "frames", "duration"):
        assert key in r["video"]
    for key in ("path", "bundle_sha256", "arch", "scale", "degradation", "validation", "train_config", "source"):
        assert key in r["model"]
    p = r["protocol"]
    for key in ("scale", "degradation", "hr_size", "lr_size", "near_seconds", "include_val", "assume_unseen",
                "same_video", "sampling", "train_frames", "val_frames", "candidates", "test_frames", "tile", "overlap",
                "device", "methods"):
        assert key in p, key
    methods = p["methods"]
    assert methods[:3] == ["bicubic", "generic", "selftransfer"]
    for f in r["frames"]:
        assert {"index", "time", "subset", "distance_s", "is_val", "metrics", "gain_psnr_y", "gain_vmaf",
                "vmaf_motion2"} <= set(f)
        assert f["subset"] in (NEAR, FAR)
        for m in methods:
            assert set(f["metrics"][m]) == {"psnr_y", "ssim_y", "psnr_rgb", "vmaf"}
    for pair in r["flicker_pairs"]:
        assert set(pair) == {"index", "subset", "flicker"} and set(pair["flicker"]) == set(methods)
    for subset in ("all", NEAR, FAR):
        s = r["summary"][subset]
        assert isinstance(s["frames"], int) and isinstance(s["pairs"], int)
        for m in methods:
            for metric in ("psnr_y", "ssim_y", "psnr_rgb", "vmaf", "flicker"):
                assert set(s["methods"][m][metric]) == {"n", "mean", "median", "worst", "worst_frame", "n_infinite"}
        assert set(s["gain_over_generic"]) == set(methods) - {"generic"}
    assert r["deployed"]["status"] in ("ok", "skipped", "error")
    assert r["vmaf"]["status"] == "ok" and r["vmaf"]["model"] == "vmaf_v0.6.1" and r["vmaf"]["package"] == "vmaf-torch"
    assert set(r["verdict"]) == {"selftransfer_beats_generic", "gain_psnr_y_mean", "gain_psnr_y_mean_near",
                                 "gain_psnr_y_mean_far", "text"}
    assert set(r["plots"]) == {"psnr_per_frame", "crops_largest_gain", "crops_smallest_gain"}


def test_end_to_end_report(report_dir, clip_path):
    import cv2

    r = json.loads((report_dir / "report.json").read_text())
    _check_schema(r)
    p = r["protocol"]
    assert p["train_frames"] == TRAIN and p["val_frames"] == VAL and not p["include_val"]
    tested = [f["index"] for f in r["frames"]]
    assert len(tested) == 4 and set(tested).isdisjoint(TRAIN + VAL)
    assert {f["subset"] for f in r["frames"]} == {NEAR, FAR}  # far frames exist, so some are tested
    assert len(r["flicker_pairs"]) == 2  # 4 frames in 2 consecutive pairs
    assert p["lr_size"] == [320, 180] and p["hr_size"] == [1280, 720] and p["scale"] == 4
    for f in r["frames"]:
        m = f["metrics"]
        # The bundle holds the official weights: self-transfer IS the generic model, on the same LR input.
        assert m["selftransfer"] == m["generic"] and f["gain_psnr_y"] == 0.0
        # CARN-M beats bicubic on real footage (published: about +2 dB at x4 on natural images).
        assert m["generic"]["psnr_y"] > m["bicubic"]["psnr_y"] + 0.5
        assert 25 < m["bicubic"]["psnr_y"] < 60 and 0.7 < m["generic"]["ssim_y"] <= 1
        # VMAF agrees at x4: CARN-M well above bicubic (whole 1280x720 frame, motion from the true neighbours).
        assert m["generic"]["vmaf"] > m["bicubic"]["vmaf"] + 3 and 0 < m["bicubic"]["vmaf"] < 100
        assert f["vmaf_motion2"] >= 0 and f["gain_vmaf"] == 0.0
    s = r["summary"]["all"]
    assert s["gain_over_generic"]["selftransfer"]["psnr_y_mean"] == 0.0
    assert s["methods"]["generic"]["flicker"]["mean"] > 0
    assert not r["verdict"]["selftransfer_beats_generic"]
    # Skipped where the plugin is not built; when it is, it must work and agree with PyTorch.
    assert r["deployed"]["status"] != "error", r["deployed"]
    if r["deployed"]["status"] == "ok":
        assert r["deployed"]["agree"], r["deployed"]
        assert r["summary"]["all"]["methods"]["deployed"]["psnr_y"]["n"] == 4
        for f in r["frames"]:
            assert f["metrics"]["deployed"]["vmaf"] == pytest.approx(f["metrics"]["selftransfer"]["vmaf"], abs=0.05)
    # Plots: real PNG files that decode to images of a sensible size.
    for name in r["plots"].values():
        data = (report_dir / name).read_bytes()
        assert data[:8] == PNG_SIGNATURE
        img = cv2.imread(str(report_dir / name))
        assert img is not None and img.shape[0] > 200 and img.shape[1] > 500
    md = (report_dir / "report.md").read_text()
    for text in ("## Protocol", "### Near", "### Far", "Y-PSNR mean", "VMAF mean", "report.json schema",
                 "psnr_per_frame.png"):
        assert text in md
    assert not list(report_dir.parent.glob(".report.*"))  # no temp directory left behind


def _variant(bundle_path, tmp_path, **changes):
    """The test bundle with manifest fields replaced (None deletes a field): same, verified members."""
    from vs_selftransfer.bundle import Bundle, write_bundle

    b = Bundle.open(bundle_path)
    manifest = {k: v for k, v in b.manifest.items() if k != "members"}
    for key, value in changes.items():
        if value is None:
            manifest.pop(key, None)
        else:
            manifest[key] = value
    path = tmp_path / "variant.stm"
    write_bundle(path, manifest, {name: b.member(name) for name in b.manifest["members"]})
    return path


def test_prepare_never_tests_training_or_validation_frames(tmp_path, clip_path, bundle_path):
    from selftransfer_trainer.evaluation.evaluate import Options, prepare

    # Frames recorded as FrameSelection.to_json() writes them: objects with an index.
    train = [{"index": i, "time": i / 25, "kind": "even"} for i in range(3, 132, 6)]
    val = [{"index": i, "time": i / 25, "kind": "even"} for i in (10, 70, 100)]
    path = _variant(bundle_path, tmp_path, frames={"train": train, "val": val})
    seen = {f["index"] for f in train} | {f["index"] for f in val}
    for kwargs in ({"frames": 24}, {"frames": None, "all_frames": True}, {"frames": None, "every": 5}):
        setup = prepare(Options(video=str(clip_path), model=str(path), output=str(tmp_path / "r"), **kwargs))
        tested = {t.index for t in setup.tests}
        assert tested and tested.isdisjoint(seen)
        assert all(t.subset == NEAR for t in setup.tests)  # a training frame every 6 frames: nothing is far
    assert len(setup.candidates) == 132 - len(seen)
    setup = prepare(Options(video=str(clip_path), model=str(path), output=str(tmp_path / "r"), frames=None,
                            all_frames=True, include_val=True))
    assert {t.index for t in setup.tests if t.is_val} == {10, 70, 100}
    assert not {t.index for t in setup.tests} & {f["index"] for f in train}


def test_prepare_other_video_or_no_frames_means_all_unseen(tmp_path, clip_path, bundle_path):
    from selftransfer_trainer.evaluation.evaluate import Options, prepare

    other = _variant(bundle_path, tmp_path, source={"sha256": "0" * 64})
    setup = prepare(Options(video=str(clip_path), model=str(other), output=str(tmp_path / "r")))
    assert setup.train == [] and not setup.same_video and all(t.subset == FAR for t in setup.candidates)
    assert len(setup.candidates) == 132 and any("trained on another video" in w for w in setup.warnings)
    # No frame list: training frames would count as unseen, so only an explicit --assume-unseen proceeds.
    unknown = _variant(bundle_path, tmp_path, frames=None)
    with pytest.raises(UserError, match="records no training frames.*--assume-unseen"):
        prepare(Options(video=str(clip_path), model=str(unknown), output=str(tmp_path / "r")))
    setup = prepare(Options(video=str(clip_path), model=str(unknown), output=str(tmp_path / "r"),
                            assume_unseen=True))
    assert len(setup.candidates) == 132 and any("--assume-unseen" in w for w in setup.warnings)


def test_prepare_degradation_from_manifest_and_override(tmp_path, clip_path, bundle_path):
    from selftransfer_trainer.evaluation.evaluate import Options, prepare

    path = _variant(bundle_path, tmp_path, degradation={"method": "x264", "crf": 30})
    setup = prepare(Options(video=str(clip_path), model=str(path), output=str(tmp_path / "r")))
    assert setup.degradation == {"method": "x264", "crf": 30} and not setup.warnings
    setup = prepare(Options(video=str(clip_path), model=str(path), output=str(tmp_path / "r"),
                            degradation="bicubic"))
    assert setup.degradation == {"method": "bicubic"}
    assert any("trained on" in w for w in setup.warnings)
    with pytest.raises(UserError, match="--crf only applies"):
        prepare(Options(video=str(clip_path), model=str(path), output=str(tmp_path / "r"), degradation="bicubic",
                        crf=20))
    bad = _variant(bundle_path, tmp_path, frames={"train": [500]})
    with pytest.raises(UserError, match="not trained on this video"):
        prepare(Options(video=str(clip_path), model=str(bad), output=str(tmp_path / "r")))


def test_existing_output_needs_force(report_dir, clip_path, bundle_path, official_path, capsys):
    from selftransfer_trainer.cli import main

    args = ["eval", str(clip_path), "--model", str(bundle_path), "-o", str(report_dir), "--frames", "1",
            "--generic", str(official_path), "--no-deployed", "--no-progress"]
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err
    before = (report_dir / "report.json").read_bytes()
    assert (report_dir / "report.json").read_bytes() == before


@pytest.mark.parametrize("extra,message", [
    (["--frames", "0"], "--frames must be at least 1"),
    (["--crf", "60"], "--crf must be between 0 and 51"),
    (["--scale", "3"], "does not match the bundle"),
    (["--degradation", "lanczos"], "--degradation must be one of"),
    (["--tile", "4"], "--tile must be 0"),
    (["--generic", "/nonexistent.pth"], "--generic /nonexistent.pth: no such file"),
])
def test_bad_arguments_are_named(tmp_path, clip_path, bundle_path, extra, message, capsys):
    from selftransfer_trainer.cli import main

    out = tmp_path / "r"
    assert main(["eval", str(clip_path), "--model", str(bundle_path), "-o", str(out), "--no-progress",
                 *extra]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_missing_model_and_video(tmp_path, clip_path, bundle_path, capsys):
    from selftransfer_trainer.cli import main

    assert main(["eval", str(clip_path), "--model", str(tmp_path / "none.stm"), "-o", str(tmp_path / "r")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "none.mp4"), "--model", str(bundle_path), "-o", str(tmp_path / "r")]) == 2
    assert "none.mp4" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_force_refuses_a_directory_that_is_not_a_report(tmp_path, clip_path, bundle_path, capsys):
    from selftransfer_trainer.cli import main

    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("keep me")
    assert main(["eval", str(clip_path), "--model", str(bundle_path), "-o", str(precious), "--force"]) == 2
    assert "does not look like an eval report" in capsys.readouterr().err
    assert (precious / "thesis.tex").read_text() == "keep me"

