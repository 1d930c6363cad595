"""Quantization-aware int8 (selftransfer_trainer.qat): a QDQ graph that OpenVINO and ONNX Runtime run as int8, close
to the fp32 network on held-out frames of the real clip, and the int8 graph quantize_for_video measures when fit
gives it the training pairs."""
import numpy as np
import pytest

from selftransfer_trainer import qat
from selftransfer_trainer.quantize import CALIB_CROPS_PER_FRAME, FLOAT_LAYERS

# Short budgets: a few steps on small patches (the measured defaults are in docs/benchmarks.md).
FEW = dict(steps=3, batch=4, patch=32, threads=2)


@pytest.fixture(scope="module")
def clip_pairs(tmp_path_factory, clip_path):
    from selftransfer_trainer.keyframes import select_frames
    from selftransfer_trainer.pairs import write_pairs

    path = tmp_path_factory.mktemp("pairs") / "bbb.h5"
    write_pairs(path, select_frames(clip_path, target=4, val=1, seed=0), 2)
    return path


@pytest.fixture(scope="module")
def calib(clip_pairs):
    from selftransfer_trainer.pairs import Pairs

    with Pairs(clip_pairs) as p:
        return [p.train_pair(i)[0] for i in range(2)]


@pytest.fixture(scope="module")
def heldout(clip_path, clip_pairs):
    """(LR, HR) crops of frames that are not training frames: textured regions, LR = MATLAB bicubic / 2."""
    from selftransfer_trainer.degrade import imresize
    from selftransfer_trainer.pairs import Pairs
    from selftransfer_trainer.video import read_frames

    with Pairs(clip_pairs) as p:
        used = set(p.train_indices) | set(p.val_indices)
    frames = [i for i in (20, 100) if i not in used]
    hrs = [rgb[240:432, 512:768].copy() for _, _, rgb in read_frames(clip_path, frames)]
    return [(imresize(hr, 0.5), hr) for hr in hrs]


@pytest.fixture(scope="module")
def generic():
    from selftransfer_trainer.weights import initial_model
    from vs_selftransfer.model import ModelConfig

    return initial_model(ModelConfig(scale=2), "official").eval()


@pytest.fixture(scope="module")
def qat_run(generic, clip_pairs, calib):
    before = {k: v.clone() for k, v in generic.state_dict().items()}
    data, report = qat.qat_graph(generic, clip_pairs, calib, qat.QATConfig(**FEW))
    after = generic.state_dict()
    assert all((before[k] == after[k]).all() for k in before), "qat_graph changed the caller's model"
    return data, report


def _chw(img):
    return np.ascontiguousarray(img.transpose(2, 0, 1), np.float32)[None] / 255.0


def _psnr(sr, hr):
    from selftransfer_trainer.metrics import psnr_y, quantize

    return psnr_y(quantize(sr[0]), hr.transpose(2, 0, 1).astype(np.float64) / 255.0, 2)


def test_graph_is_qdq_int8_with_the_float_layers_kept(qat_run):
    import onnx
    from onnx import TensorProto

    data, report = qat_run
    graph = onnx.load_from_string(data).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("QuantizeLinear") >= 36 and ops.count("DequantizeLinear") > ops.count("QuantizeLinear")
    inits = {i.name: i for i in graph.initializer}
    produced = {o: n for n in graph.node for o in n.output}
    int8_convs, float_convs = 0, 0
    for n in graph.node:
        if n.op_type != "Conv":
            continue
        w = n.input[1]
        if w in inits:  # a float layer: its weights are plain float initializers
            assert inits[w].data_type == TensorProto.FLOAT
            assert any(k in w for k in FLOAT_LAYERS), w
            float_convs += 1
        else:  # int8 initializer -> DequantizeLinear (per output channel) -> Conv
            dq = produced[w]
            assert dq.op_type == "DequantizeLinear" and inits[dq.input[0]].data_type == TensorProto.INT8
            assert produced[n.input[0]].op_type == "DequantizeLinear"  # its input comes through Q/DQ
            int8_convs += 1
    assert int8_convs == 36 and float_convs == 8  # CARN-M x2: 3 blocks x (3 shared-unit applications x 3 + 3)
    assert graph.input[0].name == "lr" and graph.output[0].name == "sr"
    assert report["method"] == "QAT" and report["steps"] == FEW["steps"]
    assert report["crops"] == 2 * CALIB_CROPS_PER_FRAME and 0 < report["loss_last"] < 0.05
    assert 0 < report["check_max_abs_diff"] <= 4e-2


def test_ort_and_openvino_int8_run_it_close_to_fp32(qat_run, generic, heldout):
    import torch

    from vs_selftransfer.backend_ort import make_session, session_runner
    from vs_selftransfer.backend_ov import open_engine
    from vs_selftransfer.bundle import PROBE_TOLERANCE

    data, _ = qat_run
    ort = session_runner(make_session(data, threads=2))
    for lr, hr in heldout:
        x = _chw(lr)
        with torch.no_grad():
            fp32 = generic(torch.from_numpy(x)).numpy()
        got_ort = np.asarray(ort(x), np.float32)
        engine = open_engine(data, what="QAT model.int8.onnx", precision="int8", threads=2, window=lr.shape[:2])
        try:
            got_ov = np.empty_like(fp32)
            engine.infer_into(x, got_ov)
        finally:
            engine.close()
        # OpenVINO computes what ONNX Runtime computes (the bundle probe's rule for int8)...
        assert np.abs(got_ov - got_ort).max() <= PROBE_TOLERANCE["int8"]
        # ...and both are int8, not a float copy, yet near fp32 on real held-out content.
        assert np.abs(got_ort - fp32).max() > 1e-3
        for got in (got_ort, got_ov):
            assert _psnr(fp32, hr) - _psnr(got, hr) < 0.5


def test_quantize_for_video_measures_the_qat_graph_when_given_the_pairs(generic, clip_pairs, calib, heldout):
    from selftransfer_trainer.export import onnx_bytes
    from selftransfer_trainer.quantize import quantize_for_video

    fp32 = onnx_bytes(generic)
    data, report = quantize_for_video(fp32, calib, heldout, 2, budget_db=100.0, engine="ort", threads=2,
                                      model=generic, pairs_path=clip_pairs, qat=qat.QATConfig(**FEW))
    assert data is not None and report["accepted"] is True
    assert report["calibration"]["method"] == "QAT" and report["calibration"]["steps"] == FEW["steps"]
    assert report["loss_db"] < 0.5 and np.isfinite(report["val_psnr_y_int8"])
    # The scheme itself, before any step (MinMax ranges on the same calibration crops), loses no more than PTQ on
    # the same held-out frames: the float layers read unquantized tensors (a few QAT steps on tiny batches, as
    # here, move the weights by more than they recover, so that comparison would not be a robust claim).
    _, scheme = quantize_for_video(fp32, calib, heldout, 2, budget_db=100.0, engine="ort", threads=2,
                                   model=generic, pairs_path=clip_pairs, qat=qat.QATConfig(**dict(FEW, steps=0)))
    _, ptq = quantize_for_video(fp32, calib, heldout, 2, budget_db=100.0, engine="ort", threads=2)
    assert ptq["calibration"]["method"] == "MinMax"
    assert scheme["loss_db"] <= ptq["loss_db"] + 0.01, (scheme["loss_db"], ptq["loss_db"])
    with pytest.raises(ValueError, match="both the model and the training pairs"):
        quantize_for_video(fp32, calib, heldout, 2, engine="ort", pairs_path=clip_pairs)


@pytest.mark.parametrize("field,value", [("steps", -1), ("steps", 1.5), ("lr", float("nan")), ("batch", 0),
                                         ("patch", 0), ("threads", -1)])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        qat.QATConfig(**{field: value})
