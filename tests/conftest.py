import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SELFTRANSFER_SHARED", ROOT.parent / "shared")) / "data"
CLIP = SHARED / "bigbuckbunny.mp4"
OFFICIAL = SHARED / "carn_m_official_x234.pth"
REFERENCE = SHARED / "carn_m_reference.npz"


def _need(path: Path) -> Path:
    if not path.is_file():
        pytest.skip(f"shared test data missing: {path}")
    return path


@pytest.fixture(scope="session")
def clip_path() -> Path:
    return _need(CLIP)


@pytest.fixture(scope="session")
def official_path() -> Path:
    return _need(OFFICIAL)


@pytest.fixture(scope="session")
def reference_path() -> Path:
    return _need(REFERENCE)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA (skips with a reason elsewhere)")
    config.addinivalue_line("markers", "slow: minutes of CPU (still part of CI)")
    _make_the_plugin_loadable()


def _make_the_plugin_loadable() -> None:
    """Every test that runs vspipe or a core needs core.selftransfer. `pip install .` puts the plugin where
    VapourSynth autoloads it; an editable install does not, so then build it in place (when missing or older than
    its source) and point VapourSynth there, for this process and every vspipe it starts. Tests never skip for a
    missing plugin: one that cannot be built fails them."""
    import importlib.util
    import subprocess
    import sys

    spec = importlib.util.find_spec("vapoursynth")
    site = Path(spec.origin).parent if spec and spec.origin else None
    if site is not None and (site / "plugins" / "selftransfer" / "libselftransfer.so").is_file():
        return
    dev = ROOT / "build" / "vsplugin"
    source = ROOT / "vs_selftransfer" / "plugin" / "selftransfer.c"
    built = dev / "libselftransfer.so"
    if not built.is_file() or built.stat().st_mtime < source.stat().st_mtime:
        subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=ROOT, check=True,
                       capture_output=True, timeout=600)
    paths = [p for p in os.environ.get("VAPOURSYNTH_EXTRA_PLUGIN_PATH", "").split(os.pathsep) if p]
    if str(dev) not in paths:
        os.environ["VAPOURSYNTH_EXTRA_PLUGIN_PATH"] = os.pathsep.join([str(dev), *paths])


@pytest.fixture(scope="session")
def generic_bundle(tmp_path_factory, official_path) -> Path:
    """The official CARN-M x2 weights exported as a bundle (what `fit` ships when nothing beats generic)."""
    from selftransfer_trainer.export import export_bundle
    from vs_selftransfer.model import ModelConfig
    from selftransfer_trainer.weights import initial_model

    path = tmp_path_factory.mktemp("bundles") / "generic_x2.stm"
    export_bundle(initial_model(ModelConfig(scale=2), str(official_path)), path)
    return path


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """A small random CARN-M x2 (8 channels): fast, for tests about plumbing rather than quality."""
    import torch

    from selftransfer_trainer.export import export_bundle
    from vs_selftransfer.model import ModelConfig, build_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("bundles") / "tiny_x2.stm"
    export_bundle(build_model(ModelConfig(scale=2, channels=8, group=4)).eval(), path)
    return path
