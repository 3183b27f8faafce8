"""Shared fixtures: tiny models with random weights, small phantoms, the shared real-data folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import pytest
import torch

from models.manifest import ModelManifest, file_sha256, load_manifest
from pipelines.phantoms import STRUCTURES, make_phantom

ROOT = Path(__file__).resolve().parents[1]


def run_tessera(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """The CLI in its own process, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "app.cli.main", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout)


def dciodvfy_errors(path: Path, iod: str) -> list[str]:
    """The error lines the standard DICOM validator (dicom3tools) reports; it must recognise ``iod``."""
    import shutil

    binary = shutil.which("dciodvfy")
    if binary is None:
        pytest.skip("dciodvfy (Debian package dicom3tools) is not installed; .ci/run installs it")
    run = subprocess.run([binary, str(path)], capture_output=True, text=True, timeout=120)
    lines = (run.stdout + run.stderr).splitlines()
    assert any(iod in line for line in lines), lines[:5]
    return [line for line in lines if line.startswith("Error")]


def shared_data_dir() -> Path | None:
    path = Path(os.environ.get("TESSERA_TEST_DATA", ROOT.parent / "shared" / "data"))
    return path if path.is_dir() else None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if path is None:
        pytest.skip("../shared/data is absent (set TESSERA_TEST_DATA to point at it)")
    return path


TINY_NETWORKS = {
    "swin_unetr": {"feature_size": 12, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 2, 2]},
    "mamba_clinix": {"base_channels": 4, "max_channels": 16, "d_state": 4},
}


def write_tiny_model(
    folder: Path,
    *,
    name: str = "tiny",
    spacing: list[float] | None = (4.0, 4.0, 4.0),  # type: ignore[assignment]
    roi: int = 64,
    seed: int = 0,
    channels: int = 1,
    family: str = "swin_unetr",
    modality: str = "CT",
) -> ModelManifest:
    """A randomly initialised tiny network of ``family`` with a manifest on the phantom labels (CT, CT2...)."""
    from models.manifest import manifest_from_dict
    from models.networks import build_network

    folder.mkdir(parents=True, exist_ok=True)
    data = {
        "name": name,
        "version": "0.0.1",
        "family": family,
        "channels": [{"name": modality if i == 0 else f"{modality}{i + 1}", "modality": modality}
                     for i in range(channels)],
        "labels": [{"value": s.value, "name": s.name} for s in STRUCTURES],
        "network": TINY_NETWORKS[family],
        "preprocessing": {"orientation": "RAS", "spacing": list(spacing) if spacing else None,
                          "intensity": {"kind": "window", "a_min": -300, "a_max": 700}},
        "inference": {"roi_size": [roi, roi, roi], "overlap": 0.25, "sw_batch_size": 2},
        "keep_largest_component": [],
        "weights": {"path": "model.pt", "sha256": None},
    }
    torch.manual_seed(seed)
    network = build_network(manifest_from_dict(data))
    torch.save(network.state_dict(), folder / "model.pt")
    data["weights"]["sha256"] = file_sha256(folder / "model.pt")
    (folder / "manifest.json").write_text(json.dumps(data))
    return load_manifest(folder / "manifest.json")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> ModelManifest:
    return write_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def tiny_model_native(tmp_path_factory: pytest.TempPathFactory) -> ModelManifest:
    """No resampling: model space is the source grid, reoriented."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny_native"), name="tiny-native", spacing=None)


@pytest.fixture(scope="session")
def tiny_mamba(tmp_path_factory: pytest.TempPathFactory) -> ModelManifest:
    return write_tiny_model(tmp_path_factory.mktemp("tiny_mamba"), name="tiny-mamba", family="mamba_clinix", roi=32)


@pytest.fixture(scope="session")
def tiny_mamba_native(tmp_path_factory: pytest.TempPathFactory) -> ModelManifest:
    return write_tiny_model(tmp_path_factory.mktemp("tiny_mamba_native"), name="tiny-mamba-native",
                            family="mamba_clinix", roi=32, spacing=None)


@pytest.fixture(scope="session")
def small_phantom_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two small coarse phantoms (image + label) as NIfTI files."""
    folder = tmp_path_factory.mktemp("phantoms")
    files = {}
    for seed in (3, 4):
        phantom = make_phantom(seed, spacing=(4.0, 4.0, 5.0))
        nib.save(phantom.image, folder / f"case{seed}.nii.gz")
        nib.save(phantom.label, folder / f"case{seed}_label.nii.gz")
        files[f"case{seed}"] = folder / f"case{seed}.nii.gz"
    return files


@pytest.fixture(scope="session")
def service_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model folder for the service tests: ``tiny`` (4 mm) and ``tiny-native`` (no resampling)."""
    root = tmp_path_factory.mktemp("service_models")
    write_tiny_model(root / "tiny")
    write_tiny_model(root / "tiny-native", name="tiny-native", spacing=None)
    write_tiny_model(root / "tiny-2ch", name="tiny-2ch", channels=2)
    write_tiny_model(root / "tiny-mamba", name="tiny-mamba", family="mamba_clinix", roi=32)
    return root
