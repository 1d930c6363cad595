"""trainer/pairs.py: the HDF5 pairs file and the patch sampler."""
import json

import numpy as np
import pytest
import torch

import badinputs
from vs_selftransfer.errors import UserError
from selftransfer_trainer.cli import main
from selftransfer_trainer.degrade import crop_to_scale, degrade
from selftransfer_trainer.keyframes import Frame, FrameSelection, select_frames
from selftransfer_trainer.pairs import Pairs, PatchSampler, write_pairs
from vs_selftransfer.probe import VideoInfo
from vs_selftransfer.files import sha256_file


@pytest.fixture(scope="module")
def selection(clip_path):
    return select_frames(clip_path, target=6, val=2)


@pytest.fixture(scope="module")
def pairs_path(selection, tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "pairs.h5"
    write_pairs(path, selection, 2)
    return path


def test_round_trip(pairs_path, selection, clip_path):
    assert [p.name for p in pairs_path.parent.iterdir()] == ["pairs.h5"]  # no temporary file left
    with Pairs(pairs_path) as pairs:
        assert pairs.scale == 2 and pairs.degradation == {"method": "bicubic", "scale": 2}
        assert pairs.target == {"kind": "frames"}
        assert pairs.train_indices == [f.index for f in selection.train]
        assert pairs.val_indices == [f.index for f in selection.val]
        assert pairs.train_times == pytest.approx([f.time for f in selection.train])
        assert pairs.train_kinds[0] == "key"
        assert pairs.source["sha256"] == sha256_file(clip_path) and pairs.source["name"] == clip_path.name
        for i, f in enumerate(selection.train):
            lr, hr = pairs.train_pair(i)
            assert np.array_equal(hr, f.image) and np.array_equal(lr, degrade(f.image, 2))
        lr, hr = pairs.val_pair(1)
        assert lr.shape == (360, 640, 3) and np.array_equal(hr, selection.val[1].image)
        with pytest.raises(IndexError):
            pairs.val_pair(2)


def test_x264_degradation_is_recorded(selection, tmp_path):
    write_pairs(tmp_path / "x264.h5", selection, 2, "x264", crf=30)
    with Pairs(tmp_path / "x264.h5") as pairs:
        assert pairs.degradation == {"method": "x264", "scale": 2, "crf": 30}
        lr, hr = pairs.train_pair(0)
        assert not np.array_equal(lr, degrade(hr, 2))


def test_video_coding_and_teacher_targets(selection, clip_path, tmp_path):
    """coding "video": each LR frame is its frame of a video of its neighbours coded at the CRF (not a lone-frame
    encode); a teacher replaces the HR side with its output on the clean downscale, and the file says so."""
    from selftransfer_trainer.degrade import imresize
    from selftransfer_trainer.pairs import VIDEO_WINDOW, video_coded_lr

    calls = []

    def teacher(clean):
        calls.append(clean)
        return np.repeat(np.repeat(clean, 2, axis=0), 2, axis=1)  # nearest x2: easy to check

    teacher.description = {"model": "nearest"}
    write_pairs(tmp_path / "v.h5", selection, 2, "x264", crf=30, coding="video", teacher=teacher)
    coded = video_coded_lr(clip_path, [selection.train[1].index], 2, 30)
    with Pairs(tmp_path / "v.h5") as pairs:
        assert pairs.degradation == {"method": "x264", "scale": 2, "crf": 30, "coding": "video",
                                     "window": VIDEO_WINDOW}
        assert pairs.target == {"kind": "teacher", "model": "nearest"}
        lr, hr = pairs.train_pair(1)
        clean = imresize(selection.train[1].image, 0.5)
        assert np.array_equal(coded[selection.train[1].index][0], clean)
        assert np.array_equal(lr, coded[selection.train[1].index][1])
        assert not np.array_equal(lr, degrade(selection.train[1].image, 2, "x264", crf=30))
        assert np.array_equal(hr, np.repeat(np.repeat(clean, 2, axis=0), 2, axis=1))
    assert len(calls) == len(selection.train) + len(selection.val)
    with pytest.raises(ValueError, match="coding"):
        write_pairs(tmp_path / "b.h5", selection, 2, "bicubic", coding="video")


def test_sampler_shapes_range_and_determinism(pairs_path):
    with Pairs(pairs_path) as pairs:
        a, b, c = PatchSampler(pairs, seed=3), PatchSampler(pairs, seed=3), PatchSampler(pairs, seed=4)
    lr, hr = next(a)
    assert lr.shape == (16, 3, 48, 48) and hr.shape == (16, 3, 96, 96)
    assert lr.dtype == hr.dtype == torch.float32 and lr.is_contiguous() and hr.is_contiguous()
    assert 0 <= float(lr.min()) and float(hr.max()) <= 1
    lr_b, hr_b = next(b)
    assert torch.equal(lr, lr_b) and torch.equal(hr, hr_b)
    assert not torch.equal(lr, next(c)[0])


def test_sampler_resumes_from_its_state(pairs_path):
    with Pairs(pairs_path) as pairs:
        a = PatchSampler(pairs, patch=24, batch=4, seed=1)
        next(a)
        state = json.loads(json.dumps(a.state_dict()))  # survives a JSON checkpoint
        want = [next(a) for _ in range(3)]
        b = PatchSampler(pairs, patch=24, batch=4, seed=99)
        b.load_state_dict(state)
        for (lr, hr), (lr_b, hr_b) in zip(want, [next(b) for _ in range(3)]):
            assert torch.equal(lr, lr_b) and torch.equal(hr, hr_b)


def test_sampler_hr_patch_is_aligned_with_lr_patch(pairs_path):
    # Shrinking the HR patch must give the LR patch (away from the patch border, where the full frame's
    # neighbours differ), whatever flip or rotation was applied: HR and LR are cut and turned together.
    with Pairs(pairs_path) as pairs:
        lr, hr = next(PatchSampler(pairs, patch=32, batch=16, seed=0))
    for k in range(16):
        lr_k = np.round(lr[k].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        hr_k = np.round(hr[k].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        shrunk = degrade(hr_k, 2).astype(int)
        assert np.abs(shrunk[3:-3, 3:-3] - lr_k[3:-3, 3:-3]).max() <= 1


def _synthetic_selection(tmp_path, size=(64, 64)):
    rng = np.random.default_rng(0)
    src = tmp_path / "fake.bin"
    src.write_bytes(b"not really a video")
    info = VideoInfo(path=str(src), width=size[1], height=size[0], fps=25.0, frames=10, duration=0.4,
                     pix_fmt="yuv420p", bit_depth=8, has_audio=False, rotation=0, vfr=False)
    image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    return FrameSelection(info=info, train=[Frame(0, 0.0, "key", image)], val=[Frame(5, 0.2, "even", image)],
                          keyframes=[0], scene_cuts=[], params={})


def test_sampler_uses_all_eight_flips_and_rotations(tmp_path):
    # One 64x64 frame, 32x32 LR patches: every patch is the whole LR frame, flipped/rotated one of 8 ways.
    selection = _synthetic_selection(tmp_path)
    write_pairs(tmp_path / "one.h5", selection, 2)
    with Pairs(tmp_path / "one.h5") as pairs:
        lr_full, hr_full = pairs.train_pair(0)
        lr, hr = next(PatchSampler(pairs, patch=32, batch=64, seed=0))
    symmetries = [lambda a, k=k, f=f: np.rot90(a[:, ::-1] if f else a, k) for k in range(4) for f in (0, 1)]
    seen = set()
    for n in range(64):
        lr_n = np.round(lr[n].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        hr_n = np.round(hr[n].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        match = [s for s, t in enumerate(symmetries) if np.array_equal(t(lr_full), lr_n)]
        assert len(match) == 1
        assert np.array_equal(symmetries[match[0]](hr_full), hr_n), "HR turned differently from LR"
        seen.add(match[0])
    assert seen == set(range(8))


def test_sampler_refuses_patches_larger_than_frames(tmp_path):
    write_pairs(tmp_path / "small.h5", _synthetic_selection(tmp_path), 2)
    with Pairs(tmp_path / "small.h5") as pairs, pytest.raises(UserError, match="smaller than the 48-pixel patch"):
        PatchSampler(pairs, patch=48)


def test_interrupted_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    """write_pairs goes through vs_selftransfer.files.atomic_path: a failure half-way (here: degrading the second
    frame) leaves the previous file as it was and nothing else; success replaces it whole."""
    import selftransfer_trainer.pairs as pairs_module

    selection = _synthetic_selection(tmp_path)
    selection.train.append(Frame(1, 0.04, "even", selection.train[0].image.copy()))
    out = tmp_path / "out" / "pairs.h5"
    out.parent.mkdir()
    out.write_bytes(b"the previous pairs file")
    calls = []

    def failing_degrade(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return degrade(*a, **k)

    monkeypatch.setattr(pairs_module, "degrade", failing_degrade)
    with pytest.raises(OSError, match="disk full"):
        write_pairs(out, selection, 2)
    assert out.read_bytes() == b"the previous pairs file" and [p.name for p in out.parent.iterdir()] == ["pairs.h5"]
    monkeypatch.setattr(pairs_module, "degrade", degrade)
    write_pairs(out, selection, 2)
    assert [p.name for p in out.parent.iterdir()] == ["pairs.h5"]
    with Pairs(out) as pairs:
        assert pairs.train_indices == [0, 1]


def test_pairs_refuses_other_files(tmp_path, clip_path):
    with pytest.raises(UserError, match="not HDF5"):
        Pairs(clip_path)
    with pytest.raises(UserError, match="no such"):
        Pairs(tmp_path / "absent.h5")


def test_cli_pairs_from_frames_file(tmp_path_factory, clip_path, tmp_path, capsys):
    clip = badinputs.session_inputs(tmp_path_factory, clip_path)["multi_key"]
    frames_json, out = tmp_path / "frames.json", tmp_path / "pairs.h5"
    assert main(["frames", str(clip), "-o", str(frames_json), "--target", "4", "--val", "2"]) == 0
    assert main(["pairs", str(clip), "-o", str(out), "--frames", str(frames_json), "--scale", "3",
                 "--degradation", "cv2_cubic"]) == 0
    listed = json.loads(frames_json.read_text())
    with Pairs(out) as pairs:
        assert pairs.train_indices == [f["index"] for f in listed["train"]]
        assert pairs.scale == 3 and pairs.degradation["method"] == "cv2_cubic"
        lr, hr = pairs.train_pair(0)
        assert hr.shape == (180, 318, 3) and lr.shape == (60, 106, 3)
        assert np.array_equal(hr, crop_to_scale(hr, 3))
    # An existing output is refused without --force, and kept as it was.
    before = out.read_bytes()
    assert main(["pairs", str(clip), "-o", str(out), "--scale", "2"]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == before
