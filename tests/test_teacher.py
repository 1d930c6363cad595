"""trainer/teacher.py: the generic model's output on the clean downscale as the HR target."""
import numpy as np

from selftransfer_trainer.degrade import imresize
from selftransfer_trainer.metrics import psnr_y, quantize
from selftransfer_trainer.teacher import GenericTeacher
from selftransfer_trainer.video import read_frames
from selftransfer_trainer.weights import initial_model
from vs_selftransfer.model import ModelConfig, torch_runner


def test_teacher_is_the_initial_weights_output(clip_path, official_path):
    """Exactly the generic network's 8-bit output on the clean downscale, at the frame's size, and (being a
    trained SR network) far closer to the real frame than a nearest-neighbour upscale."""
    cfg = ModelConfig(arch="carn_m", scale=2, group=4)
    teacher = GenericTeacher(cfg, str(official_path), "official", None, threads=2)
    (_, _, frame), = read_frames(clip_path, [30])
    clean = imresize(frame[:180, :320], 0.5)
    target = teacher(clean)
    assert target.shape == (180, 320, 3) and target.dtype == np.uint8
    model = initial_model(cfg, str(official_path)).eval()
    x = np.ascontiguousarray(np.moveaxis(clean, -1, 0), np.float32)[None] / 255
    want = np.round(np.clip(torch_runner(model)(x)[0], 0, 1) * 255).astype(np.uint8)
    assert np.array_equal(target, np.moveaxis(want, 0, -1))
    hr = np.moveaxis(frame[:180, :320], -1, 0) / 255.0
    nearest = np.repeat(np.repeat(clean, 2, axis=0), 2, axis=1)
    assert psnr_y(np.moveaxis(target, -1, 0) / 255.0, hr, 2) > psnr_y(np.moveaxis(nearest, -1, 0) / 255.0, hr, 2) + 3
    assert teacher.description["model"] == "official"
