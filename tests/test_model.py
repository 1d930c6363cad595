import numpy as np
import pytest
import torch

from vs_selftransfer.model import (ARCHS, RECEPTIVE_RADIUS, ModelConfig, build_model, load_state, official_to_single_scale)
from selftransfer_trainer.weights import initial_model, read_state_dict


@pytest.mark.parametrize("arch,group", [("carn_m", 4), ("carn", 1)])
@pytest.mark.parametrize("scale", [2, 3, 4])
def test_tiny_shapes(arch, group, scale):
    model = build_model(ModelConfig(arch=arch, scale=scale, channels=8, group=group)).eval()
    with torch.no_grad():
        y = model(torch.rand(2, 3, 11, 7))
    assert y.shape == (2, 3, 11 * scale, 7 * scale)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="scale"):
        ModelConfig(scale=5)
    with pytest.raises(ValueError, match="architecture"):
        ModelConfig(arch="edsr")
    with pytest.raises(ValueError, match="multiple"):
        ModelConfig(channels=10, group=4)
    with pytest.raises(ValueError, match="unknown"):
        ModelConfig.from_dict({"arch": "carn_m", "depth": 3})


def test_names_match_official_state_dict(official_path):
    state = read_state_dict(official_path)
    ours = set(build_model(ModelConfig(scale=2)).state_dict())
    mapped = set(official_to_single_scale(state, 2))
    assert ours == mapped
    # CARN-M shares one residual unit per cascading block, like the official recursion
    assert not any(".b2.body" in k or ".b3.body" in k for k in ours if k.startswith("b1."))


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_reproduces_official_outputs(official_path, reference_path, scale):
    ref = np.load(reference_path)
    x = torch.from_numpy(ref["input_uint8_rgb_hwc"].astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    model = initial_model(ModelConfig(scale=scale), str(official_path)).eval()
    with torch.no_grad():
        y = model(x).numpy()
    expected = ref[f"output_x{scale}_float_nchw"]
    assert y.shape == expected.shape
    assert np.abs(y - expected).max() <= 1e-5


def test_wrong_weights_are_refused(official_path):
    state = official_to_single_scale(read_state_dict(official_path), 2)
    with pytest.raises(ValueError, match="do not fit carn"):
        load_state(build_model(ModelConfig(arch="carn", group=1)), state)


def test_pickled_code_is_refused(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    p = tmp_path / "evil.pth"
    p.write_bytes(pickle.dumps({"x": Evil()}))
    with pytest.raises(ValueError, match="weights-only"):
        read_state_dict(p)


def test_receptive_radius_bounds_the_influence():
    """A pixel change must not reach outputs further than RECEPTIVE_RADIUS LR pixels away (tiling relies on it)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(scale=4, channels=8)).eval()
    x = torch.rand(1, 3, 64, 64)
    x2 = x.clone()
    x2[0, :, 32, 32] += 0.5
    with torch.no_grad():
        d = (model(x) - model(x2)).abs()[0].sum(0)
    ys, xs = torch.nonzero(d > 0, as_tuple=True)
    reach = max((ys // 4 - 32).abs().max().item(), (xs // 4 - 32).abs().max().item())
    assert 0 < reach <= RECEPTIVE_RADIUS
