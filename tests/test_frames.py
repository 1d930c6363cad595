"""trainer/video.py and trainer/keyframes.py on the real shared clip and on clips made from it."""
import json

import numpy as np
import pytest

import badinputs
from selftransfer_trainer import keyframes
from selftransfer_trainer import video
from selftransfer_trainer.cli import main
from selftransfer_trainer.keyframes import NEAR_DUPLICATE_MAD, load_selection, select_frames
from vs_selftransfer.probe import frame_table, probe
from selftransfer_trainer.video import read_frames


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, clip_path):
    return badinputs.session_inputs(tmp_path_factory, clip_path)


@pytest.fixture(scope="module")
def selection(clip_path):
    return select_frames(clip_path)


def test_probe_shared_clip(clip_path):
    info = probe(clip_path)
    assert (info.width, info.height, info.frames) == (1280, 720, 132)
    assert info.fps == pytest.approx(25.0)
    assert info.duration == pytest.approx(132 / 25)
    assert (info.pix_fmt, info.bit_depth, info.rotation) == ("yuv420p", 8, 0)
    assert info.has_audio and not info.vfr
    assert len(info.sha256) == 64


def test_shared_clip_has_one_keyframe(clip_path):
    assert frame_table(clip_path).keyframes == (0,)


def test_read_frames_all_and_subset_agree(clip_path):
    every = {i: (t, img) for i, t, img in read_frames(clip_path)}
    assert sorted(every) == list(range(132))
    assert all(t == pytest.approx(i / 25) for i, (t, _) in every.items())
    assert every[0][1].shape == (720, 1280, 3) and every[0][1].dtype == np.uint8
    subset = list(read_frames(clip_path, [131, 7, 64, 7]))
    assert [i for i, _, _ in subset] == [7, 64, 131]
    for i, t, img in subset:
        assert t == every[i][0] and np.array_equal(img, every[i][1])
    with pytest.raises(ValueError, match="out of range"):
        list(read_frames(clip_path, [132]))


@pytest.mark.parametrize("min_skip", [1, 48])
def test_read_frames_seeks_to_later_keyframes_exactly(inputs, monkeypatch, min_skip):
    # Seeking happens when the next wanted frame's keyframe is at least min_skip frames ahead.
    monkeypatch.setattr(video, "SEEK_MIN_SKIP", min_skip)
    path = inputs["multi_key"]
    assert frame_table(path).keyframes == (0, 50, 100)
    every = [img for _, _, img in read_frames(path)]
    for wanted in ([120], [3, 60, 99, 100, 120, 131], [49, 50, 51], [0, 131]):
        got = list(read_frames(path, wanted))
        assert [i for i, _, _ in got] == wanted
        for i, _, img in got:
            assert np.array_equal(img, every[i]), f"frame {i} differs from the sequential decode"


def test_selection_on_shared_clip(selection):
    assert selection.keyframes == [0] and selection.scene_cuts == []
    assert len(selection.train) == 24 and len(selection.val) == 4
    assert (selection.train[0].index, selection.train[0].kind) == (0, "key")
    assert {f.kind for f in selection.train[1:]} == {"even"}
    train = [f.index for f in selection.train]
    val = [f.index for f in selection.val]
    assert train == sorted(set(train)) and val == sorted(set(val))
    for v in val:
        assert min(abs(v - t) for t in train) >= 2, f"validation frame {v} is a training frame or its neighbour"
    # One validation frame in each quarter of the video.
    assert [v * 4 // 132 for v in val] == [0, 1, 2, 3]
    for f in selection.train + selection.val:
        assert f.image.shape == (720, 1280, 3) and f.image.dtype == np.uint8
        assert f.time == pytest.approx(f.index / 25)


def test_selection_has_no_near_duplicates(selection):
    thumbs = [keyframes._thumbnail(_as_frame(f.image)) for f in selection.train]
    for a in range(len(thumbs)):
        for b in range(a):
            assert keyframes._mad(thumbs[a], thumbs[b]) >= NEAR_DUPLICATE_MAD


def test_selection_images_are_the_decoded_frames(selection, clip_path):
    f = selection.val[1]
    (_, _, img), = read_frames(clip_path, [f.index])
    assert np.array_equal(img, f.image)


def test_selection_is_deterministic(selection, clip_path):
    again = select_frames(clip_path)
    assert again.to_json() == selection.to_json()


def test_selection_json_has_no_images(selection):
    data = json.loads(json.dumps(selection.to_json()))
    assert data["video"]["frames"] == 132 and data["keyframes"] == [0]
    assert [f["index"] for f in data["train"]] == [f.index for f in selection.train]
    assert set(data["train"][0]) == {"index", "time", "kind"}


def test_scene_cut_found(inputs):
    s = select_frames(inputs["scene_cut"], target=8, val=2)
    assert s.keyframes == [0] and s.scene_cuts == [30]
    assert (30, "scene") in [(f.index, f.kind) for f in s.train]


def test_keyframes_only_when_there_are_enough(inputs, monkeypatch):
    # With as many keyframes as wanted, no decoding pass over the other frames happens.
    monkeypatch.setattr(keyframes, "_scan", lambda info: pytest.fail("decoded every frame"))
    s = select_frames(inputs["multi_key"], target=3, val=2)
    assert [(f.index, f.kind) for f in s.train] == [(0, "key"), (50, "key"), (100, "key")]
    assert len(s.val) == 2 and all(min(abs(v.index - t) for t in (0, 50, 100)) >= 2 for v in s.val)


def test_keyframe_pass_decodes_only_keyframes(inputs):
    info = probe(inputs["multi_key"])
    thumbs = keyframes._keyframe_thumbnails(info, frame_table(inputs["multi_key"]))
    assert sorted(thumbs) == [0, 50, 100]


def test_seed_breaks_ties_only(inputs):
    a = select_frames(inputs["multi_key"], seed=0)
    b = select_frames(inputs["multi_key"], seed=0)
    c = select_frames(inputs["multi_key"], seed=5)
    assert a.to_json() == b.to_json()
    assert [f.index for f in a.val] == [f.index for f in c.val]
    assert len(c.train) == len(a.train)


def test_cli_frames_writes_json_and_pngs(inputs, tmp_path, capsys):
    out, pngs = tmp_path / "frames.json", tmp_path / "pngs"
    assert main(["frames", str(inputs["multi_key"]), "-o", str(out), "--target", "6", "--val", "2",
                 "--png-dir", str(pngs)]) == 0
    data = json.loads(out.read_text())
    assert len(data["train"]) == 6 and len(data["val"]) == 2
    names = sorted(p.name for p in pngs.iterdir())
    assert len(names) == 8 and f"train_{data['train'][0]['index']:06d}.png" in names
    assert "3 keyframes" in capsys.readouterr().out
    # Reading it back decodes the same frames.
    s = load_selection(out)
    fresh = select_frames(inputs["multi_key"], target=6, val=2)
    assert [f.index for f in s.train] == [f.index for f in fresh.train]
    assert all(np.array_equal(a.image, b.image) for a, b in zip(s.val, fresh.val))
    # The frames file belongs to its video.
    with pytest.raises(Exception, match="another video"):
        load_selection(out, inputs["scene_cut"])


def _as_frame(img):
    import av

    return av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
