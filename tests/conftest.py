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
