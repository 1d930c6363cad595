"""Runtime backends: each CPU backend reproduces the eager PyTorch model (fp32, 1e-4) untiled and through the
tiling function, validates its arguments and inputs, and says which package to install when it cannot run."""
import sys

import numpy as np
import pytest
import torch

from vs_selftransfer import backend_ort, backend_ov, backend_torch, backend_trt
from vs_selftransfer.bundle import Bundle
from vs_selftransfer.tiling import upscale_image, window_shape

CPU_BACKENDS = {"ort": backend_ort, "ov": backend_ov, "torch": backend_torch}
TILE, OVERLAP = 40, 24  # overlap >= the receptive radius (22): tiled must equal untiled


@pytest.fixture(scope="module")
def bundle(generic_bundle):
    return Bundle.open(generic_bundle)


@pytest.fixture(scope="module")
def image(reference_path):
    """A real 64x64 photo, mirrored out to a non-square 96x112 (3, H, W) float image."""
    hwc = np.load(reference_path)["input_uint8_rgb_hwc"]
    hwc = np.pad(hwc, ((0, 32), (0, 48), (0, 0)), mode="symmetric")
    return np.ascontiguousarray(hwc.transpose(2, 0, 1), dtype=np.float32) / 255.0


@pytest.fixture(scope="module")
def expected(bundle, image):
    with torch.no_grad():
        return bundle.torch_model()(torch.from_numpy(image)[None]).numpy()[0]


def _need(module, device="cpu"):
    if reason := module.available(device):
        pytest.skip(reason)


@pytest.mark.parametrize("name", sorted(CPU_BACKENDS))
def test_cpu_backend_matches_eager_untiled_and_tiled(name, bundle, image, expected):
    module = CPU_BACKENDS[name]
    _need(module)
    threads = 1 if name != "torch" else 0  # torch's thread count is process-wide: leave it alone
    whole = module.Backend(bundle, threads=threads, window=image.shape[1:])
    assert whole.name == name
    assert np.abs(upscale_image(whole, image, 2) - expected).max() <= 1e-4

    window = window_shape(*image.shape[1:], TILE, TILE, OVERLAP)
    assert window == (88, 88)  # 3 x 3 windows: the test really tiles
    tiled_backend = module.Backend(bundle, threads=threads, window=window)
    tiled = upscale_image(tiled_backend, image, 2, tile=TILE, overlap=OVERLAP)
    assert np.abs(tiled - expected).max() <= 1e-4


@pytest.mark.parametrize("name", sorted(CPU_BACKENDS))
def test_outputs_belong_to_the_caller_and_inputs_are_not_touched(name, bundle):
    module = CPU_BACKENDS[name]
    _need(module)
    backend = module.Backend(bundle, threads=1 if name != "torch" else 0, window=(12, 20))
    rng = np.random.default_rng(0)
    x1, x2 = (rng.random((1, 3, 12, 20), dtype=np.float32) for _ in range(2))
    x1_copy = x1.copy()
    y1 = backend(x1)
    y1_copy = y1.copy()
    y2 = backend(x2)
    assert y1.shape == y2.shape == (1, 3, 24, 40) and y1.dtype == np.float32
    assert np.array_equal(x1, x1_copy) and np.array_equal(y1, y1_copy)  # the second call reused no buffer of ours
    assert not np.array_equal(y1, y2)


@pytest.mark.parametrize("name", sorted(CPU_BACKENDS))
def test_bad_inputs_and_arguments_are_refused(name, bundle):
    module = CPU_BACKENDS[name]
    _need(module)
    backend = module.Backend(bundle, threads=1 if name != "torch" else 0, window=(8, 8))
    x = np.zeros((1, 3, 8, 8), np.float32)
    for bad, match in ((x.astype(np.float64), "float32"), (x[0], r"\(N, 3, H, W\)"),
                       (np.zeros((1, 3, 8, 9), np.float32), "not the window"), (x.tolist(), "numpy array")):
        with pytest.raises(ValueError, match=match):
            backend(bad)
    for kwargs, match in (({"threads": -1}, "threads"), ({"window": (0, 8)}, "window"), ({"window": 8}, "window"),
                          ({"device": "tpu"}, "device"), ({"precision": "fp8"}, "precision")):
        with pytest.raises(ValueError, match=match):
            module.Backend(bundle, **kwargs)
    with pytest.raises(ValueError, match="Bundle"):
        module.Backend(str(bundle.path))


def test_strided_input_is_accepted(bundle):
    """A non-contiguous view (e.g. a crop) is copied once into a contiguous array, not refused."""
    backend = backend_ort.Backend(bundle, threads=1, window=(8, 8))
    big = np.random.default_rng(1).random((1, 3, 16, 16), dtype=np.float32)
    assert np.array_equal(backend(big[:, :, 4:12, 4:12]), backend(np.ascontiguousarray(big[:, :, 4:12, 4:12])))


def test_one_onnx_runtime_session_builder(bundle, image, expected, tmp_path):
    """make_session is what the ort backend, training validation, the export check and int8 measurement open graphs
    with: from bytes or a file, the threads asked for, no memory arena (it keeps the peak of every shape it saw)."""
    data = bundle.member("model.onnx")
    (tmp_path / "model.onnx").write_bytes(data)
    x = image[None].copy()
    outputs = []
    for graph in (data, tmp_path / "model.onnx", str(tmp_path / "model.onnx")):
        session = backend_ort.make_session(graph, threads=1)
        options = session.get_session_options()
        assert options.intra_op_num_threads == 1 and not options.enable_cpu_mem_arena
        assert session.get_providers() == ["CPUExecutionProvider"]
        outputs.append(backend_ort.session_runner(session)(x))
    assert all(np.array_equal(outputs[0], y) for y in outputs[1:])
    assert np.abs(outputs[0][0] - expected).max() <= 1e-4
    backend = backend_ort.Backend(bundle, threads=1, window=image.shape[1:])
    assert not backend.session.get_session_options().enable_cpu_mem_arena
    with pytest.raises(ValueError, match="device"):
        backend_ort.make_session(data, device="tpu")


# -- precisions ------------------------------------------------------------------------------------------------
def test_precision_errors_say_what_to_use(bundle):
    with pytest.raises(ValueError, match="runs fp32 .*bf16 use the ov backend"):
        backend_ort.Backend(bundle, precision="bf16")
    with pytest.raises(ValueError, match="model.int8.onnx"):
        backend_ort.Backend(bundle, precision="int8")
    with pytest.raises(ValueError, match="fp16 is for CUDA"):
        backend_torch.Backend(bundle, precision="fp16")
    with pytest.raises(ValueError, match="int8 runs on ort or ov"):
        backend_torch.Backend(bundle, precision="int8")


def test_torch_bf16_autocast_runs_close_to_fp32(bundle, image, expected):
    backend = backend_torch.Backend(bundle, precision="bf16")
    out = backend(image[None, :, :32, :40].copy())
    assert out.dtype == np.float32
    assert 0 < np.abs(out[0] - expected[:, :64, :80]).max() < 0.1  # bf16 was really used, and it is close


def test_ov_bf16_only_where_native(bundle, image, expected):
    _need(backend_ov)
    ov = backend_ov.import_openvino()
    if "BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        with pytest.raises(ValueError, match="natively"):
            backend_ov.Backend(bundle, precision="bf16")
        return
    backend = backend_ov.Backend(bundle, precision="bf16", threads=1, window=(32, 40))
    out = backend(image[None, :, :32, :40].copy())
    assert np.abs(out[0] - expected[:, :64, :80]).max() < 0.1


# -- missing backends --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("module,package,install", [
    (backend_ort, "onnxruntime", "pip install onnxruntime"),
    (backend_ov, "openvino", "pip install openvino"),
    (backend_torch, "torch", "pip install torch"),
])
def test_missing_package_says_what_to_install(monkeypatch, bundle, module, package, install):
    monkeypatch.setitem(sys.modules, package, None)  # makes `import package` raise ImportError
    assert install in module.available("cpu")
    with pytest.raises(RuntimeError, match=install):
        module.Backend(bundle)


def test_unusable_devices_are_explained():
    assert "NVIDIA" in backend_trt.available("cpu")
    assert "NVIDIA" in backend_ov.available("cuda")
    assert "device must be" in backend_ort.available("tpu:0")
    if not torch.cuda.is_available():
        assert "no CUDA device" in backend_trt.available("cuda")
        assert "no CUDA device" in backend_torch.available("cuda:0")
    import onnxruntime as ort
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert "onnxruntime-gpu" in backend_ort.available("cuda")


def test_trt_without_cuda_refuses_clearly(bundle):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        backend_trt.Backend(bundle, device="cuda", window=(64, 64))
    with pytest.raises(ValueError, match="runs on cuda"):
        backend_trt.Backend(bundle, device="cpu")


# -- TensorRT engine bookkeeping (pure Python: runs without a GPU) ---------------------------------------------------
FACTS = {"gpu": "NVIDIA H100", "compute_capability": "9.0", "tensorrt": "10.9.0", "torch_tensorrt": "2.7.0",
         "torch": "2.7.0", "cuda": "12.8"}


def test_engine_key_covers_everything_that_shapes_an_engine():
    base = backend_trt.engine_key("a" * 64, (1, 3, 64, 64), "fp16", FACTS)
    assert base == backend_trt.engine_key("a" * 64, (1, 3, 64, 64), "fp16", dict(FACTS))
    others = [backend_trt.engine_key("b" * 64, (1, 3, 64, 64), "fp16", FACTS),
              backend_trt.engine_key("a" * 64, (1, 3, 64, 72), "fp16", FACTS),
              backend_trt.engine_key("a" * 64, (1, 3, 64, 64), "fp32", FACTS)]
    others += [backend_trt.engine_key("a" * 64, (1, 3, 64, 64), "fp16", {**FACTS, k: "other"}) for k in FACTS]
    assert len({base, *others}) == 1 + len(others)  # all different


def test_bundle_engine_is_used_only_where_it_fits():
    info = {"precision": "fp16", "compute_capability": "9.0", "tensorrt": "10.9.0",
            "min_shape": [1, 3, 16, 16], "max_shape": [1, 3, 1088, 1920]}
    fits = backend_trt.bundle_engine_fits
    assert fits(info, "fp16", (360, 640), FACTS) is None
    assert fits(info, "fp16", None, FACTS) is None
    assert "no TensorRT engine" in fits(None, "fp16", (360, 640), FACTS)
    assert "fp16, not fp32" in fits(info, "fp32", (360, 640), FACTS)
    assert "compute_capability 9.0" in fits(info, "fp16", (360, 640), {**FACTS, "compute_capability": "8.6"})
    assert "tensorrt 10.9.0" in fits(info, "fp16", (360, 640), {**FACTS, "tensorrt": "10.10.0"})
    assert "outside" in fits(info, "fp16", (2160, 3840), FACTS)
    assert "shape range" in fits({**info, "max_shape": None}, "fp16", (360, 640), FACTS)


# -- GPU ---------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("precision,tolerance", [("fp32", 2e-2), ("fp16", 2e-2)])  # cuDNN may use TF32 for fp32
def test_torch_cuda(bundle, image, expected, precision, tolerance):
    _need(backend_torch, "cuda")
    backend = backend_torch.Backend(bundle, device="cuda", precision=precision, window=image.shape[1:])
    assert np.abs(backend(image[None].copy())[0] - expected).max() <= tolerance


@pytest.mark.gpu
def test_trt_builds_checks_and_caches_an_engine(bundle, image, expected, tmp_path, monkeypatch):
    _need(backend_trt, "cuda")
    monkeypatch.setenv("SELFTRANSFER_CACHE", str(tmp_path))
    backend = backend_trt.Backend(bundle, device="cuda", precision="fp16", window=image.shape[1:])
    assert np.abs(backend(image[None].copy())[0] - expected).max() <= 2e-2
    cached = list((tmp_path / "engines").glob("*.ts"))
    assert len(cached) == 1 and backend.source == str(cached[0])
    again = backend_trt.Backend(bundle, device="cuda", precision="fp16", window=image.shape[1:])
    assert again.source == str(cached[0])
    assert np.abs(again(image[None].copy())[0] - expected).max() <= 2e-2
