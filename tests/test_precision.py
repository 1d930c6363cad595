"""precision="auto": the fastest precision this CPU computes natively, only where fit measured it within budget on
the video's held-out frames (vs_selftransfer.runtime.precision_choice, trainer/precision.py for bf16, the int8
record of trainer/quantize.py); the decision with fake CPU flags and manifests, and a real bf16 run against fp32."""
from __future__ import annotations

import numpy as np
import pytest

from vs_selftransfer import backend_ov, runtime
from vs_selftransfer.backend_base import native_support

BF16 = frozenset({"avx2", "avx512f", "avx512_bf16"})
AMX = frozenset({"avx2", "amx_bf16", "amx_int8", "amx_tile"})
VNNI = frozenset({"avx2", "avx512_vnni"})
AVX2 = frozenset({"avx2", "fma"})
FRAMES = (20, 100)
CROP = (slice(0, 120), slice(200, 360))  # 160x120 LR: real footage, quick


class FakeBundle:
    def __init__(self, precision: dict | None = None, members=("model.onnx",)):
        self.manifest = {"precision": precision} if precision is not None else {}
        self._members = set(members)

    def has(self, name: str) -> bool:
        return name in self._members


def record(engine="ov", accepted=True, loss=0.01, seconds=None):
    return {"accepted": accepted, "engine": engine, "budget_db": 0.05, "loss_db": loss,
            "s_per_val_frame": seconds or {}}


def test_native_support_reads_the_flags():
    assert native_support("bf16", BF16) == "avx512_bf16"
    assert native_support("bf16", AMX) == "amx_bf16"
    assert native_support("int8", AMX) == "amx_int8"
    assert native_support("int8", VNNI) == "avx512_vnni"
    assert native_support("bf16", AVX2) is None and native_support("int8", AVX2) is None


def test_fp32_without_measurements():
    precision, why = runtime.precision_choice(FakeBundle(), "ov", "cpu", flags=AMX)
    assert precision == "fp32" and "bf16 not measured" in why and "int8 not measured" in why


def test_bf16_only_where_measured_within_budget_and_native():
    ok = FakeBundle({"bf16": record(loss=0.012)})
    precision, why = runtime.precision_choice(ok, "ov", "cpu", flags=BF16)
    assert precision == "bf16" and "-0.012 dB vs fp32" in why and "avx512_bf16" in why
    assert runtime.choose_precision(ok, "ov", "cpu", flags=AMX) == "bf16"
    precision, why = runtime.precision_choice(ok, "ov", "cpu", flags=AVX2)
    assert precision == "fp32" and "not native" in why
    assert runtime.choose_precision(ok, "ort", "cpu", flags=BF16) == "fp32"  # ONNX Runtime: no bf16 kernels
    assert runtime.choose_precision(ok, "ov", "gpu", flags=BF16) == "fp32"
    assert runtime.choose_precision(ok, "torch", "cuda", flags=BF16) == "fp32"

    lost = FakeBundle({"bf16": record(accepted=False, loss=0.081)})
    precision, why = runtime.precision_choice(lost, "ov", "cpu", flags=BF16)
    assert precision == "fp32" and "lost 0.081 dB" in why

    elsewhere = FakeBundle({"bf16": record(engine="ort")})
    precision, why = runtime.precision_choice(elsewhere, "ov", "cpu", flags=BF16)
    assert precision == "fp32" and "measured on 'ort'" in why

    unmeasured = FakeBundle({"bf16": {"accepted": False, "measured": False, "engine": "ov", "budget_db": 0.05,
                                      "reason": "not measured: the CPU fit ran on has no native bf16"}})
    precision, why = runtime.precision_choice(unmeasured, "ov", "cpu", flags=BF16)
    assert precision == "fp32" and "no native bf16" in why

    for broken in ({"bf16": "yes"}, {"bf16": {"accepted": "true", "engine": "ov"}}, "bf16"):
        assert runtime.choose_precision(FakeBundle(broken), "ov", "cpu", flags=BF16) == "fp32"


def test_int8_where_vnni_and_an_accepted_graph():
    members = ("model.onnx", "model.int8.onnx")
    int8 = FakeBundle({"int8": record(seconds={"fp32": 2.0, "int8": 0.8})}, members)
    assert runtime.choose_precision(int8, "ov", "cpu", flags=VNNI) == "int8"
    assert runtime.choose_precision(int8, "ort", "cpu", flags=VNNI) == "fp32"  # measured on ov only
    # Without VNNI only where fit measured the graph faster than fp32.
    assert runtime.choose_precision(int8, "ov", "cpu", flags=AVX2) == "int8"
    slow = FakeBundle({"int8": record(seconds={"fp32": 2.0, "int8": 2.5})}, members)
    assert runtime.choose_precision(slow, "ov", "cpu", flags=AVX2) == "fp32"
    assert runtime.choose_precision(slow, "ov", "cpu", flags=VNNI) == "int8"
    missing = FakeBundle({"int8": record(seconds={"fp32": 2.0, "int8": 0.8})})
    precision, why = runtime.precision_choice(missing, "ov", "cpu", flags=VNNI)
    assert precision == "fp32" and "model.int8.onnx is missing" in why


def test_the_fastest_measured_of_several_accepted():
    members = ("model.onnx", "model.int8.onnx")
    both = {"int8": record(seconds={"fp32": 2.0, "int8": 0.6}), "bf16": record(seconds={"fp32": 2.0, "bf16": 0.9})}
    assert runtime.choose_precision(FakeBundle(both, members), "ov", "cpu", flags=AMX) == "int8"
    both["bf16"]["s_per_val_frame"]["bf16"] = 0.5
    assert runtime.choose_precision(FakeBundle(both, members), "ov", "cpu", flags=AMX) == "bf16"
    # Only bf16 native (no VNNI, int8 measured slower than fp32): bf16.
    both["int8"]["s_per_val_frame"]["int8"] = 2.5
    assert runtime.choose_precision(FakeBundle(both, members), "ov", "cpu", flags=BF16) == "bf16"
    # Records measured at different times: compared by their speed-up over their own fp32, not by seconds (the
    # figures measured here: int8 1.35x, bf16 2.05x over fp32).
    both = {"int8": record(seconds={"fp32": 2.78, "int8": 2.06}), "bf16": record(seconds={"fp32": 4.46, "bf16": 2.18})}
    assert runtime.choose_precision(FakeBundle(both, members), "ov", "cpu", flags=AMX) == "bf16"
    # int8 rejected: bf16 all the same.
    both["int8"] = record(accepted=False, loss=0.17)
    precision, why = runtime.precision_choice(FakeBundle(both, members), "ov", "cpu", flags=AMX)
    assert precision == "bf16" and "int8 lost 0.170 dB" in why


# -- real runs ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def val_pairs(clip_path):
    from selftransfer_trainer.degrade import degrade
    from selftransfer_trainer.video import read_frames

    pairs = []
    for _, _, rgb in read_frames(str(clip_path), list(FRAMES)):
        lr = degrade(rgb, 2)[CROP]
        pairs.append((lr, rgb[CROP[0].start * 2:CROP[0].stop * 2, CROP[1].start * 2:CROP[1].stop * 2]))
    return pairs


@pytest.fixture(scope="module")
def calib_lr(clip_path):
    """LR calibration frames other than the validation frames."""
    from selftransfer_trainer.degrade import degrade
    from selftransfer_trainer.video import read_frames

    return [degrade(rgb, 2)[CROP] for _, _, rgb in read_frames(str(clip_path), [40, 70])]


def _native_bf16_or_skip():
    if backend_ov.available("cpu") is not None:
        pytest.skip(f"OpenVINO unavailable: {backend_ov.available('cpu')}")
    if native_support("bf16") is None:
        pytest.skip("this CPU has no native bf16 (AVX512-BF16/AMX): OpenVINO cannot compute it here")


def test_real_bf16_against_fp32_in_db(generic_bundle, val_pairs):
    """The official CARN-M x2 on real frames: bf16 really differs from fp32, by well under the budget."""
    from selftransfer_trainer.precision import measure_bf16
    from vs_selftransfer.bundle import Bundle

    _native_bf16_or_skip()
    bundle = Bundle.open(generic_bundle)
    rec = measure_bf16(bundle.member("model.onnx"), val_pairs, 2, threads=1)
    assert rec["measured"] and rec["engine"] == "ov" and rec["native"] == native_support("bf16")
    assert rec["val_psnr_y_fp32"] > 35  # CARN-M on this clip: a sane fp32 figure
    assert rec["val_psnr_y_fp32"] != rec["val_psnr_y_bf16"]  # bf16 was really computed
    assert abs(rec["loss_db"]) < 0.05 and rec["accepted"] is True
    assert set(rec["s_per_val_frame"]) == {"fp32", "bf16"}


def test_fit_records_bf16_and_auto_runs_it(tmp_path, official_path, val_pairs, monkeypatch):
    """export_bundle(val=...) records the measurement; create(precision=auto) runs bf16 from it and says why, and
    falls back to fp32 when the engine refuses what the flags promised."""
    from selftransfer_trainer.export import export_bundle
    from selftransfer_trainer.weights import initial_model
    from vs_selftransfer.model import ModelConfig

    _native_bf16_or_skip()
    path = tmp_path / "measured.stm"
    manifest = export_bundle(initial_model(ModelConfig(scale=2), str(official_path)), path, torchscript=False,
                             tensorrt=False, val=val_pairs)
    rec = manifest["precision"]["bf16"]
    assert rec["measured"] and rec["accepted"] is (rec["loss_db"] <= 0.05)
    h, w = val_pairs[0][0].shape[:2]
    up = runtime.create(str(path), backend="ov", threads=1, width=w, height=h)
    assert up.precision == ("bf16" if rec["accepted"] else "fp32")
    assert up.choice["precision"].startswith(up.precision)
    assert runtime.versions()["last_upscale"].startswith(f"ov {up.precision} on cpu")
    assert "last_upscale_precision" in runtime.versions()

    real = backend_ov.Backend

    class RefusesBf16(real):
        def __init__(self, bundle, **kw):
            if kw.get("precision") == "bf16":
                raise ValueError("precision bf16 needs a CPU that computes it natively")
            super().__init__(bundle, **kw)

    monkeypatch.setattr(backend_ov, "Backend", RefusesBf16)
    if rec["accepted"]:
        up = runtime.create(str(path), backend="ov", threads=1, width=w, height=h)
        assert up.precision == "fp32" and "refused bf16" in up.choice["precision"]
    with pytest.raises(ValueError, match="natively"):  # asked for by name: the error, not a silent fallback
        runtime.create(str(path), backend="ov", precision="bf16", threads=1, width=w, height=h)


def test_unmeasurable_without_native_bf16(val_pairs):
    from selftransfer_trainer.precision import measure_bf16

    rec = measure_bf16(b"not used", val_pairs, 2, flags=AVX2)
    assert rec == {"engine": "ov", "budget_db": 0.05, "accepted": False, "measured": False,
                   "reason": rec["reason"]} and "no native bf16" in rec["reason"]


def test_worker_process_matches_in_process(tiny_bundle, monkeypatch):
    """The engine next to vs-mlrt (a worker process) gives the in-process engine's numbers, and a dead worker is a
    clear error."""
    from vs_selftransfer.bundle import Bundle

    if backend_ov.in_process_unavailable() is not None:
        pytest.skip(f"OpenVINO does not load in this process: {backend_ov.in_process_unavailable()}")
    bundle = Bundle.open(tiny_bundle)
    x = np.random.default_rng(0).random((1, 3, 24, 32), dtype=np.float32)
    here = backend_ov.Backend(bundle, threads=1, window=(24, 32))(x)
    monkeypatch.setattr(backend_ov, "in_process_unavailable", lambda: "another OpenVINO runtime library (test)")
    worker = backend_ov.Backend(bundle, threads=1, window=(24, 32))
    assert "worker process" in worker.description
    assert np.array_equal(worker(x), here)
    assert np.array_equal(worker(x + 0), here)  # the shared buffers are reused between calls
    worker.engine.process.kill()
    worker.engine.process.wait()
    with pytest.raises(RuntimeError, match="worker process .* died"):
        worker(x)
    worker.close()


def test_int8_float_layers_follow_the_record_and_the_cpu():
    """The int8 graph's float layers run in bf16 only where fit measured them so and this CPU computes bf16."""
    measured_bf16 = {"precision": {"int8": dict(record(), float_layers="bf16")}}
    measured_fp32 = {"precision": {"int8": dict(record(), float_layers="fp32")}}
    assert backend_ov.int8_float_layers(measured_bf16, flags=BF16 | VNNI) == "bf16"
    assert backend_ov.int8_float_layers(measured_bf16, flags=AMX) == "bf16"
    assert backend_ov.int8_float_layers(measured_bf16, flags=VNNI) == "fp32"  # no bf16 here: fp32, closer to fp32
    assert backend_ov.int8_float_layers(measured_fp32, flags=BF16 | VNNI) == "fp32"  # bf16 was not measured
    assert backend_ov.int8_float_layers({"precision": {"int8": record()}}, flags=BF16) == "fp32"  # older record
    assert backend_ov.int8_float_layers({}, flags=BF16) == "fp32"
    with pytest.raises(ValueError, match="int8 graph only"):
        backend_ov.open_engine(b"", precision="bf16", float_layers="bf16")


def test_real_int8_with_bf16_float_layers(official_path, val_pairs, calib_lr):
    """The official CARN-M x2 on real frames: the int8 graph is measured with fp32 and with bf16 float layers, the
    record names the variant it accepted, and the ov backend runs that variant (its numbers match the record)."""
    from selftransfer_trainer.export import export_bundle
    from selftransfer_trainer.metrics import psnr_y, quantize
    from selftransfer_trainer.weights import initial_model
    from vs_selftransfer.bundle import Bundle
    from vs_selftransfer.model import ModelConfig

    _native_bf16_or_skip()
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "int8.stm"
        manifest = export_bundle(initial_model(ModelConfig(scale=2), str(official_path)), path, torchscript=False,
                                 tensorrt=False, int8={"calib": calib_lr, "val": val_pairs})
        rec = manifest["precision"]["int8"]
        variants = rec["float_layer_variants"]
        assert set(variants) == {"fp32", "bf16"} and rec["engine"] == "ov"
        assert variants["bf16"]["val_psnr_y_int8"] != variants["fp32"]["val_psnr_y_int8"]  # bf16 really computed
        for v in variants.values():  # int8 is really int8: not the fp32 figure, and within a sane distance of it
            assert 0 < abs(v["loss_db"]) < 0.3
        assert rec["accepted"] is variants[rec["float_layers"]]["accepted"]
        if not rec["accepted"]:
            pytest.skip(f"int8 not accepted on these frames ({rec['loss_db']:+.3f} dB): nothing to run")
        bundle = Bundle.open(path)
        backend = backend_ov.Backend(bundle, precision="int8", threads=1, window=val_pairs[0][0].shape[:2])
        assert backend.float_layers == rec["float_layers"]
        assert f"({'bf16' if rec['float_layers'] == 'bf16' else 'f32'} float layers)" in backend.description
        scores = []
        for lr, hr in val_pairs:
            sr = backend(np.ascontiguousarray(lr.transpose(2, 0, 1)[None], np.float32) / 255.0)[0]
            scores.append(psnr_y(quantize(sr), hr.transpose(2, 0, 1).astype(np.float64) / 255.0, 2))
        assert np.mean(scores) == pytest.approx(rec["val_psnr_y_int8"], abs=1e-3)
        why = runtime.precision_choice(bundle, "ov", "cpu")[1]
        assert "int8" in why and "float layers in" in why
