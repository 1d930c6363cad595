"""The package's shape: the two phases, dependencies one way, the official weights shipped, nothing named `trainer`."""
import ast
from importlib import metadata
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_the_runtime_side_never_imports_the_trainer():
    offenders = {}
    for path in sorted((ROOT / "vs_selftransfer").rglob("*.py")):
        bad = {n for n in _imports(path) if n.split(".")[0] in ("trainer", "selftransfer_trainer")}
        if bad:
            offenders[str(path.relative_to(ROOT))] = sorted(bad)
    assert not offenders, f"vs_selftransfer must not import the trainer: {offenders}"


def test_nothing_imports_a_top_level_trainer_package():
    for folder in ("trainer", "vs_selftransfer", "tests", "scripts"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            bad = {n for n in _imports(path) if n == "trainer" or n.startswith("trainer.")}
            assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}: the package is selftransfer_trainer"


def test_the_installed_distribution_has_no_top_level_trainer():
    dist = metadata.distribution("selftransfer")
    top = set((dist.read_text("top_level.txt") or "").split())
    assert top, "the distribution does not list its top-level packages"
    assert "trainer" not in top
    assert {"selftransfer_trainer", "vs_selftransfer"} <= top
    (script,) = dist.entry_points.select(group="console_scripts", name="selftransfer")
    assert script.value == "selftransfer_trainer.cli:main"


def test_the_shipped_official_weights_are_the_checkpoint_converted(official_path):
    from safetensors.torch import load_file

    from vs_selftransfer.files import sha256_file
    from vs_selftransfer.model import OFFICIAL_WEIGHTS, official_weights_path

    assert sha256_file(official_path) == OFFICIAL_WEIGHTS["source_sha256"]
    shipped = load_file(str(official_weights_path()))
    original = torch.load(official_path, map_location="cpu", weights_only=True)
    assert shipped.keys() == original.keys()
    assert all(torch.equal(shipped[k], original[k]) for k in original)
    assert (official_weights_path().parent / "LICENSE.CARN-pytorch").read_text().count("MIT License") == 1


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_init_official_reads_the_shipped_weights_for_every_head(scale, official_path, monkeypatch, tmp_path):
    from selftransfer_trainer.weights import initial_model
    from vs_selftransfer.model import ModelConfig

    monkeypatch.setenv("HOME", str(tmp_path))  # an empty home: no cache to fall back on
    shipped = initial_model(ModelConfig(scale=scale), "official").state_dict()
    from_pth = initial_model(ModelConfig(scale=scale), str(official_path)).state_dict()
    assert all(torch.equal(shipped[k], from_pth[k]) for k in from_pth)
    assert not any(tmp_path.iterdir()), "reading the official weights wrote into HOME"


def test_damaged_shipped_weights_are_refused(tmp_path, monkeypatch):
    import vs_selftransfer.model as model

    fake = tmp_path / "official"
    fake.mkdir()
    (fake / model.OFFICIAL_WEIGHTS["file"]).write_bytes(b"not the weights")
    monkeypatch.setattr(model, "__file__", str(tmp_path / "model.py"))
    with pytest.raises(ValueError, match=r"damaged \(sha256 mismatch\); reinstall"):
        model.official_weights_path()


def test_no_code_path_downloads_anything():
    for folder in ("trainer", "vs_selftransfer"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            bad = {n for n in _imports(path) if n.split(".")[0] in ("urllib", "requests", "http", "huggingface_hub")}
            assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}: nothing may download at run time"
