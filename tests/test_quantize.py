"""Per-video int8: calibrated on the video's frames, shipped only within the measured budget."""
import numpy as np
import pytest

from selftransfer_trainer import quantize as q
from selftransfer_trainer.degrade import degrade
from vs_selftransfer.bundle import Bundle


@pytest.fixture(scope="module")
def frames(clip_path):
    from selftransfer_trainer.video import read_frames

    hr = [rgb[200:296, 400:528].copy() for _, _, rgb in read_frames(clip_path, [0, 40, 80])]
    return [(degrade(h, 2), h) for h in hr]


def test_rejects_outside_budget_and_accepts_inside(tiny_bundle, frames):
    onnx = Bundle.open(tiny_bundle).member("model.onnx")
    calib = [lr for lr, _ in frames[:2]]
    data, rep = q.quantize_for_video(onnx, calib, frames[2:], 2, budget_db=-1.0, engine="ort", threads=1)
    assert data is None and rep["accepted"] is False
    assert rep["loss_db"] > -1.0 and rep["engine"] == "ort"
    data, rep = q.quantize_for_video(onnx, calib, frames[2:], 2, budget_db=100.0, engine="ort", threads=1)
    assert rep["accepted"] is True and data[:2] != b""
    from vs_selftransfer.bundle import check_onnx
    check_onnx(data)  # a valid, self-contained graph with the lr/sr interface
    assert rep["calibration"]["crops"] == 2 * q.CALIB_CROPS_PER_FRAME


def test_export_records_the_decision_and_runtime_can_use_it(tmp_path, frames, monkeypatch):
    import torch

    from selftransfer_trainer.export import export_bundle
    from vs_selftransfer.model import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(scale=2, channels=8)).eval()
    monkeypatch.setattr(q, "BUDGET_DB", 100.0)
    manifest = export_bundle(model, tmp_path / "m.stm", torchscript=False,
                             int8={"calib": [lr for lr, _ in frames[:2]], "val": frames[2:]})
    assert manifest["precision"]["int8"]["accepted"] is True
    assert "model.int8.onnx" in manifest["members"]
    from vs_selftransfer.backend_ort import Backend

    b = Bundle.open(tmp_path / "m.stm")
    x = np.random.default_rng(0).random((1, 3, 24, 32), dtype=np.float32)
    out = Backend(b, precision="int8", threads=1, window=(24, 32))(x)
    ref = Backend(b, precision="fp32", threads=1, window=(24, 32))(x)
    assert out.shape == ref.shape == (1, 3, 48, 64)
    assert 0 < np.abs(out - ref).max() < 0.25  # quantized, not garbage


def test_runtime_picks_int8_only_where_it_was_accepted(tmp_path, frames, monkeypatch):
    import torch

    from selftransfer_trainer.export import export_bundle
    from vs_selftransfer.model import ModelConfig, build_model
    from vs_selftransfer.runtime import choose_precision

    torch.manual_seed(0)
    model = build_model(ModelConfig(scale=2, channels=8)).eval()
    for budget, name in ((100.0, "ok.stm"), (-1.0, "no.stm")):
        monkeypatch.setattr(q, "BUDGET_DB", budget)
        export_bundle(model, tmp_path / name, torchscript=False,
                      int8={"calib": [frames[0][0]], "val": frames[2:]})
    ok, no = Bundle.open(tmp_path / "ok.stm"), Bundle.open(tmp_path / "no.stm")
    engine = ok.manifest["precision"]["int8"]["engine"]
    other = "ort" if engine == "ov" else "ov"
    vnni = frozenset({"avx512_vnni"})  # int8 native, bf16 not (export measured bf16 too: see tests/test_precision.py)
    assert choose_precision(ok, engine, "cpu", flags=vnni) == "int8"
    assert choose_precision(ok, other, "cpu", flags=vnni) == "fp32"  # measured on another engine: not trusted
    assert choose_precision(ok, engine, "cuda", flags=vnni) == "fp32"
    assert choose_precision(no, engine, "cpu", flags=vnni) == "fp32"
    assert not no.has("model.int8.onnx") and no.manifest["precision"]["int8"]["accepted"] is False
