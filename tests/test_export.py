"""Export: the bundle holds the weights and graphs that reproduce them, the manifest says what it is, a graph that
does not reproduce the weights never ships, and the CLI (`export`, `info`) fails clearly on bad input."""
import hashlib
import io
import json
import zipfile
from datetime import datetime, timezone

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
import torch

import selftransfer_trainer.export as export
from selftransfer_trainer.cli import main
from selftransfer_trainer.export import ExportCheckError, export_bundle
from vs_selftransfer import backend_trt
from vs_selftransfer.graph_check import check_image
from vs_selftransfer.model import ModelConfig, build_model
from selftransfer_trainer.weights import initial_model
from vs_selftransfer.bundle import INPUT, Bundle


@pytest.fixture(scope="module")
def tiny_model(tiny_bundle):
    return Bundle.open(tiny_bundle).torch_model()


@pytest.fixture(autouse=True)
def reuse_onnx_exports(tiny_bundle, monkeypatch):
    """The torch.export-based ONNX exporter takes seconds per call on 2 cores. Tests here that are not about the
    exporter reuse its output for identical weights: the tiny bundle's graph (a real export, checked when the
    session fixture wrote it), or any graph exported earlier in this module."""
    b = Bundle.open(tiny_bundle)
    memo = _ONNX_MEMO.setdefault(hashlib.sha256(b.member("weights.safetensors")).hexdigest(), b.member("model.onnx"))
    del memo
    real = export.onnx_bytes

    def onnx_bytes(model):
        key = hashlib.sha256(export.weights_bytes(model)).hexdigest()
        if key not in _ONNX_MEMO:
            _ONNX_MEMO[key] = real(model)
        return _ONNX_MEMO[key]
    monkeypatch.setattr(export, "onnx_bytes", onnx_bytes)


_ONNX_MEMO: dict[str, bytes] = {}


# -- the official weights, exported (conftest's generic_bundle) ------------------------------------------------
def test_manifest_fields(generic_bundle):
    m = Bundle.open(generic_bundle).manifest
    assert m["format"] == "selftransfer-bundle" and m["format_version"] == 2 and m["probe"]["shape"] == [1, 3, 16, 16]
    assert (m["arch"], m["scale"]) == ("carn_m", 2)
    assert m["model_config"] == ModelConfig(scale=2).to_dict()
    assert m["input"] == INPUT
    created = datetime.fromisoformat(m["created"])
    assert created.tzinfo is not None and abs((datetime.now(timezone.utc) - created).days) < 2
    for dist in ("selftransfer", "torch", "onnx", "onnxruntime", "safetensors"):
        assert m["versions"][dist]
    checks = m["export_checks"]
    assert checks["tolerance"] == 1e-4
    assert set(checks["max_abs_diff"]) == {"model.onnx", "model.ts"}
    assert all(0 <= d <= 1e-4 for d in checks["max_abs_diff"].values())
    if not torch.cuda.is_available():
        assert "model.trt.ts" not in m["members"] and "tensorrt" not in m


def test_member_hashes_and_sizes_match_the_zip(generic_bundle):
    m = Bundle.open(generic_bundle).manifest
    with zipfile.ZipFile(generic_bundle) as zf:
        names = set(zf.namelist())
        assert all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())
        for name, info in m["members"].items():
            data = zf.read(name)
            assert info == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    assert names == {"manifest.json", *m["members"]}
    assert {"weights.safetensors", "model.onnx", "model.ts"} <= names


def test_weights_round_trip_exactly(generic_bundle, official_path):
    original = initial_model(ModelConfig(scale=2), str(official_path)).state_dict()
    restored = Bundle.open(generic_bundle).state_dict()
    assert set(restored) == set(original)
    assert all(torch.equal(restored[k], original[k]) for k in original)


def test_onnx_is_one_clean_self_contained_graph(generic_bundle):
    model = onnx.ModelProto.FromString(Bundle.open(generic_bundle).member("model.onnx"))
    onnx.checker.check_model(model)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    tensors = list(model.graph.initializer)
    assert tensors and all(t.data_location != onnx.TensorProto.EXTERNAL and not t.external_data for t in tensors)
    (inp,), (out,) = model.graph.input, model.graph.output
    assert (inp.name, out.name) == ("lr", "sr")
    dims = inp.type.tensor_type.shape.dim
    assert dims[1].dim_value == 3 and all(d.dim_param for d in (dims[0], dims[2], dims[3]))  # dynamic N, H, W
    assert {n.op_type for n in model.graph.node} <= {"Conv", "Relu", "Concat", "Add", "DepthToSpace"}
    assert not any(n.metadata_props for n in model.graph.node)  # no source paths of the exporting machine


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_graphs_reproduce_the_model_on_unseen_shapes(generic_bundle, official_path):
    import onnxruntime as ort

    b = Bundle.open(generic_bundle)
    eager = initial_model(ModelConfig(scale=2), str(official_path)).eval()
    session = ort.InferenceSession(b.member("model.onnx"), providers=["CPUExecutionProvider"])
    ts = torch.jit.load(io.BytesIO(b.member("model.ts")))
    x = check_image((1, 3, 31, 45), seed=7)
    with torch.no_grad():
        expected = eager(x).numpy()
        assert np.abs(ts(x).numpy() - expected).max() <= 1e-4
        assert np.array_equal(b.torch_model()(x).numpy(), expected)
    assert np.abs(session.run(["sr"], {"lr": x.numpy()})[0] - expected).max() <= 1e-4


# -- the export check ------------------------------------------------------------------------------------------
def _perturbed(model):
    bad = build_model(model.cfg)
    bad.load_state_dict(model.state_dict())
    with torch.no_grad():
        bad.exit.bias += 1e-3  # ten times the tolerance
    return bad.eval()


def _with_perturbed_output_bias(onnx_data: bytes) -> bytes:
    """The graph with the bias of the conv that writes "sr" moved by 1e-3 (ten times the tolerance)."""
    proto = onnx.ModelProto.FromString(onnx_data)
    last = next(n for n in proto.graph.node if "sr" in n.output)
    assert last.op_type == "Conv"
    bias = next(t for t in proto.graph.initializer if t.name == last.input[2])
    values = onnx.numpy_helper.to_array(bias) + np.float32(1e-3)
    bias.CopyFrom(onnx.numpy_helper.from_array(values.astype(np.float32), bias.name))
    return proto.SerializeToString()


@pytest.mark.parametrize("member", ["onnx", "torchscript"])
def test_a_graph_that_differs_fails_the_export_and_writes_nothing(tmp_path, monkeypatch, tiny_model, member):
    if member == "onnx":
        good = export.onnx_bytes
        monkeypatch.setattr(export, "onnx_bytes", lambda model: _with_perturbed_output_bias(good(model)))
    else:
        real = export.torchscript_bytes
        monkeypatch.setattr(export, "torchscript_bytes", lambda model: real(_perturbed(model)))
    out = tmp_path / "x.stm"
    out.write_bytes(b"the previous bundle")
    with pytest.raises(ExportCheckError, match=r"differs from the PyTorch model by 0\.001"):
        export_bundle(tiny_model, out, tensorrt=False)
    assert out.read_bytes() == b"the previous bundle"
    assert [p.name for p in tmp_path.iterdir()] == ["x.stm"]  # no temp file left behind


def test_a_graph_that_does_not_run_fails_the_export(tmp_path, monkeypatch, tiny_model):
    monkeypatch.setattr(export, "torchscript_bytes", lambda model: b"not torchscript")
    with pytest.raises(ExportCheckError, match="model.ts does not load"):
        export_bundle(tiny_model, tmp_path / "x.stm", tensorrt=False)
    assert not list(tmp_path.iterdir())


def test_graph_check_is_the_runtime_side_piece_export_and_the_trt_backend_share(tiny_model):
    from vs_selftransfer.graph_check import CHECK_SHAPES, GraphCheckError, check_graph
    from vs_selftransfer.model import torch_runner

    eager = torch_runner(tiny_model, "cpu", channels_last=False)
    assert check_graph("same", lambda: eager, eager, 0.0) == 0.0
    off = 5e-3
    with pytest.raises(GraphCheckError, match=r"shifted differs from the PyTorch model by 0\.005 \(> 0\.001\)"):
        check_graph("shifted", lambda: lambda x: eager(x) + np.float32(off), eager, 1e-3)
    assert check_graph("shifted", lambda: lambda x: eager(x) + np.float32(off), eager, 1e-2) == pytest.approx(off, rel=1e-4)
    with pytest.raises(GraphCheckError, match="broken does not load: nope"):
        check_graph("broken", lambda: (_ for _ in ()).throw(OSError("nope")), eager, 1e-3)
    with pytest.raises(GraphCheckError, match="returned shape"):
        check_graph("cropped", lambda: lambda x: eager(x)[..., :-1], eager, 1e-3)
    with pytest.raises(GraphCheckError, match="differs"):
        check_graph("nan", lambda: lambda x: eager(x) * np.nan, eager, 1e-3, shapes=CHECK_SHAPES[:1])


def test_export_arguments_are_validated_before_any_work(tmp_path, tiny_model):
    with pytest.raises(TypeError, match="CARN"):
        export_bundle(torch.nn.Conv2d(3, 3, 1), tmp_path / "a.stm")
    with pytest.raises(ValueError, match="tensorrt"):
        export_bundle(tiny_model, tmp_path / "a.stm", tensorrt="yes")
    with pytest.raises(ValueError, match="may not set"):
        export_bundle(tiny_model, tmp_path / "a.stm", extra={"scale": 4})
    with pytest.raises(ValueError, match="JSON"):
        export_bundle(tiny_model, tmp_path / "a.stm", extra={"source": {"when": datetime.now()}})
    with pytest.raises(ValueError, match="must be a dict"):
        export_bundle(tiny_model, tmp_path / "a.stm", extra={"validation": 31.5})
    with pytest.raises(FileNotFoundError, match="directory does not exist"):
        export_bundle(tiny_model, tmp_path / "missing" / "a.stm")
    with pytest.raises(IsADirectoryError):
        export_bundle(tiny_model, tmp_path)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            export_bundle(tiny_model, tmp_path / "a.stm", tensorrt=True)
    assert not list(tmp_path.iterdir())


# -- CLI ---------------------------------------------------------------------------------------------------------
VALIDATION = {"metric": "psnr_y", "frames": [3, 40], "bicubic_psnr_y": 30.0, "generic_psnr_y": 31.0,
              "selftransfer_psnr_y": 31.6, "shipped_psnr_y": 31.6, "shipped": "selftransfer",
              "message": "shipping step 10: 31.600 dB vs generic 31.000 dB"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_model):
    """A model.pth as trainer/train.py writes it: the shipped weights, their config and validation figures."""
    path = tmp_path_factory.mktemp("ckpt") / "model.pth"
    torch.save({"model": tiny_model.state_dict(), "model_config": tiny_model.cfg.to_dict(),
                "validation": VALIDATION}, path)
    return path


def test_cli_exports_a_training_checkpoint_and_info_describes_it(tmp_path, checkpoint, tiny_model, capsys):
    out = tmp_path / "m.stm"
    assert main(["export", str(checkpoint), "-o", str(out), "--tensorrt", "no"]) == 0
    b = Bundle.open(out)
    assert b.manifest["validation"] == VALIDATION
    assert b.model_config() == tiny_model.cfg
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "carn_m x2, 8 channels" in text
    assert "bicubic_psnr_y 30.000 dB, generic_psnr_y 31.000 dB, selftransfer_psnr_y 31.600 dB" in text
    assert "shipping step 10" in text
    assert "model.ts" in text and "carries code" in text and "weights.safetensors" in text and "data only" in text
    assert main(["info", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["members"] == b.manifest["members"]

    # refuses to overwrite without --force; a bundle re-exports into a bundle, its fields kept
    assert main(["export", str(checkpoint), "-o", str(out)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    again = tmp_path / "again.stm"
    assert main(["export", str(out), "-o", str(again), "--no-torchscript"]) == 0
    m2 = Bundle.open(again).manifest
    assert m2["validation"] == VALIDATION and "model.ts" not in m2["members"]
    assert m2["members"]["weights.safetensors"] == b.manifest["members"]["weights.safetensors"]
    assert main(["export", str(checkpoint), "-o", str(out), "--force", "--no-torchscript"]) == 0
    assert "model.ts" not in Bundle.open(out).manifest["members"]


def test_resumable_training_checkpoint_exports_its_best_weights(tmp_path, tiny_model):
    """train.py's checkpoint.pt holds the last step's weights and the best validated ones: export the best."""
    last = build_model(tiny_model.cfg).state_dict()  # some other weights
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": "selftransfer-train-checkpoint", "version": 1, "step": 7, "model": last,
                "best": {"step": 5, "psnr_y": 31.2, "model": tiny_model.state_dict()},
                "model_config": tiny_model.cfg.to_dict(), "train_config": {"steps": 7}}, path)
    model, extra = export.load_for_export(path)
    assert all(torch.equal(v, tiny_model.state_dict()[k]) for k, v in model.state_dict().items())
    assert extra == {"train_config": {"steps": 7}}


def test_cli_errors(tmp_path, checkpoint, tiny_model, capsys):
    out = str(tmp_path / "m.stm")
    plain = tmp_path / "plain.pth"
    torch.save(tiny_model.state_dict(), plain)
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    evil = tmp_path / "evil.pth"
    torch.save({"model": Evil()}, evil)
    cases = [
        ([str(tmp_path / "missing.pt"), "-o", out], "checkpoint not found"),
        ([str(tmp_path), "-o", out], "is a directory"),
        ([str(plain), "-o", out], "pass --scale"),
        ([str(plain), "-o", out, "--scale", "2"], "weights do not fit carn_m x2"),  # 8 channels, not 64
        ([str(text), "-o", out], "not a weights-only PyTorch checkpoint"),
        ([str(evil), "-o", out], "not a weights-only PyTorch checkpoint"),
        ([str(checkpoint), "-o", out, "--scale", "3"], "--scale 3 disagrees"),
        ([str(checkpoint), "-o", str(tmp_path / "no" / "m.stm")], "output directory does not exist"),
        ([str(checkpoint), "-o", str(tmp_path)], "is a directory"),
    ]
    for args, message in cases:
        assert main(["export", *args]) == 2, args
        assert message in capsys.readouterr().err, args
    assert main(["info", str(text)]) == 2
    assert "not a selftransfer bundle" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.pth", "notes.pth", "plain.pth"]


def test_cli_exports_plain_weights_with_scale(tmp_path, tiny_model):
    plain = tmp_path / "w.safetensors"
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in tiny_model.state_dict().items()}, plain)
    out = tmp_path / "w.stm"
    assert main(["export", str(plain), "-o", str(out), "--scale", "2", "--channels", "8", "--no-torchscript"]) == 0
    b = Bundle.open(out)
    x = check_image((1, 3, 20, 24))
    with torch.no_grad():
        assert torch.equal(b.torch_model()(x), tiny_model(x))


# -- GPU ---------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_tensorrt_engine_is_exported_and_checked(tmp_path, official_path):
    if reason := backend_trt.available():
        pytest.skip(reason)
    model = initial_model(ModelConfig(scale=2), str(official_path))
    shapes = {"min": (1, 3, 16, 16), "opt": (1, 3, 64, 64), "max": (1, 3, 128, 128)}
    m = export_bundle(model, tmp_path / "g.stm", tensorrt=True, trt_shapes=shapes)
    trt = m["tensorrt"]
    assert "model.trt.ts" in m["members"] and trt["precision"] == "fp16"
    assert trt["min_shape"] == [1, 3, 16, 16] and trt["max_shape"] == [1, 3, 128, 128]
    assert trt["gpu"] == torch.cuda.get_device_name() and trt["tensorrt"]
    assert 0 <= m["export_checks"]["max_abs_diff"]["model.trt.ts"] <= backend_trt.TRT_FP16_TOLERANCE
