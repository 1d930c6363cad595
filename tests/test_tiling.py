import numpy as np
import pytest
import torch

from vs_selftransfer import tiling
from vs_selftransfer.model import RECEPTIVE_RADIUS, ModelConfig, build_model, torch_runner
from vs_selftransfer.tiling import auto_tile, tile_windows, tiled_upscale, upscale_image, window_shape


@pytest.mark.parametrize("size,tile,overlap", [(100, 32, 8), (64, 64, 8), (65, 64, 24), (130, 64, 24), (7, 3, 0), (360, 128, 24)])
def test_windows_cover_exactly_once_with_fixed_size(size, tile, overlap):
    wins = tile_windows(size, tile, overlap)
    covered = np.zeros(size, int)
    sizes = set()
    for w0, w1, c0, c1 in wins:
        assert 0 <= w0 <= c0 < c1 <= w1 <= size
        covered[c0:c1] += 1
        sizes.add(w1 - w0)
    assert (covered == 1).all()
    assert len(sizes) == 1  # one input shape per clip: engines are built once


def test_no_tiling_when_tile_is_zero_or_larger():
    assert tile_windows(50, 0, 8) == [(0, 50, 0, 50)]
    assert tile_windows(50, 64, 8) == [(0, 50, 0, 50)]
    assert tile_windows(50, 20, 16) == [(0, 50, 0, 50)]  # the window would cover the axis anyway
    assert window_shape(360, 640, 128, 0, 24) == (176, 640)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(1)
    model = build_model(ModelConfig(scale=2, channels=16)).eval()

    def run(x):
        with torch.no_grad():
            return model(torch.from_numpy(x)).numpy()
    return run


@pytest.mark.parametrize("tile", [16, (24, 40), 33])
def test_tiled_equals_untiled_without_seams(net, tile):
    rng = np.random.default_rng(0)
    img = rng.random((3, 70, 90), dtype=np.float32)
    whole = upscale_image(net, img, 2)
    tiled = upscale_image(net, img, 2, tile=tile, overlap=RECEPTIVE_RADIUS + 2)
    assert np.abs(whole - tiled).max() <= 1e-4


def test_small_overlap_shows_seams(net):
    """The seam test can fail: with too little context the tile borders differ from the whole-frame output."""
    rng = np.random.default_rng(0)
    img = rng.random((3, 64, 64), dtype=np.float32)
    whole = upscale_image(net, img, 2)
    tiled = upscale_image(net, img, 2, tile=16, overlap=2)
    assert np.abs(whole - tiled).max() > 1e-3


def test_strided_plane_views_and_buffer_reuse(net):
    rng = np.random.default_rng(2)
    big = rng.random((3, 40, 64), dtype=np.float32)
    src = [p[:, :50] for p in big]  # non-contiguous views, like padded frame memory
    dst_mem = np.zeros((3, 80, 128), np.float32)
    dst = [p[:, :100] for p in dst_mem]
    buf = np.empty((1, 3, 40, 40), np.float32)
    tiled_upscale(net, src, dst, 2, tile=20, overlap=10, buffer=buf)
    expected = upscale_image(net, np.stack(src), 2, tile=20, overlap=10)
    assert np.array_equal(np.stack(dst), expected)
    assert (dst_mem[:, :, 100:] == 0).all()  # nothing written outside the destination


def test_rejects_bad_shapes(net):
    img = np.zeros((3, 8, 8), np.float32)
    with pytest.raises(ValueError, match="scale"):
        tiled_upscale(net, list(img), list(np.zeros((3, 8, 8), np.float32)), 2)
    with pytest.raises(ValueError, match="overlap"):
        upscale_image(net, img, 2, tile=4, overlap=-1)
    with pytest.raises(ValueError, match="backend returned"):
        upscale_image(lambda x: x, img, 2)


def test_exact_temporal_reuse_is_lossless_and_skips_identical_windows(net):
    rng = np.random.default_rng(3)
    a = rng.random((3, 64, 64), dtype=np.float32)
    b = a.copy()
    b[:, 50:, 50:] += 0.25  # only the bottom-right corner changes
    cache: dict = {}
    out_a = np.empty((3, 128, 128), np.float32)
    out_b = np.empty((3, 128, 128), np.float32)
    assert tiled_upscale(net, list(a), list(out_a), 2, tile=16, overlap=8, reuse=cache) == 16
    ran = tiled_upscale(net, list(b), list(out_b), 2, tile=16, overlap=8, reuse=cache)
    assert 0 < ran < 16
    assert np.array_equal(out_b, upscale_image(net, b, 2, tile=16, overlap=8))
    # an identical frame runs nothing
    assert tiled_upscale(net, list(b), list(out_a), 2, tile=16, overlap=8, reuse=cache) == 0
    assert np.array_equal(out_a, out_b)
    # a new geometry is not confused with the stored one
    small = np.empty((3, 96, 96), np.float32)
    assert tiled_upscale(net, list(b[:, :48, :48]), list(small), 2, tile=16, overlap=8, reuse=cache) == 9


# -- the one tile rule and overlap (the filter, evaluation and training validation all use them) ----------------------
def test_default_overlap_keeps_tiles_exact():
    assert tiling.OVERLAP >= RECEPTIVE_RADIUS


@pytest.mark.parametrize("width,height,tile", [(640, 360, 0), (512, 512, 0), (1, 1, 0), (513, 512, 384),
                                               (960, 540, 384), (1920, 1080, 384), (100, 5000, 384)])
def test_auto_tile_runs_frames_whole_up_to_the_budget_and_tiles_above_it(width, height, tile):
    assert auto_tile(width, height) == tile
    # What the network sees at once (a whole frame, or a tile with its context) stays within the memory budget.
    wh, ww = window_shape(height, width, tile, tile, tiling.OVERLAP)
    assert wh * ww <= tiling.AUTO_TILE_MAX_PIXELS


def test_torch_runner_runs_the_model_as_it_is():
    """The one PyTorch runner: float32 C-contiguous output equal to the eager model's in either layout, and the
    model (device, layout, train mode) untouched, so a model being trained can be validated in place."""
    torch.manual_seed(3)
    model = build_model(ModelConfig(scale=2, channels=8)).train()
    x = np.random.default_rng(3).random((2, 3, 20, 28), dtype=np.float32)
    layouts = {k: v.is_contiguous() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = model.eval()(torch.from_numpy(x)).numpy()
    model.train()
    for channels_last in (None, True, False):
        y = torch_runner(model.eval(), "cpu", channels_last=channels_last)(x)
        assert y.dtype == np.float32 and y.flags.c_contiguous and not np.shares_memory(y, x)
        assert np.abs(y - expected).max() <= 1e-5
    model.train()
    torch_runner(model, "cpu")(x)
    assert model.training
    assert {k: v.is_contiguous() for k, v in model.state_dict().items()} == layouts
