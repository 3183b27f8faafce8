"""External Swin-UNETR checkpoints in the MONAI model-zoo layout load through a manifest and run."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.networks.nets import SwinUNETR

from models.checkpoints import read_state_dict
from models.manifest import load_manifest
from models.networks import build_network
from pipelines.errors import ModelError
from pipelines.inference import Predictor
from pipelines.segment import segment_volume
from pipelines.volume import Volume, VolumeMetadata

EXAMPLE = Path(__file__).resolve().parents[1] / "models" / "examples" / "swin_unetr_btcv.json"


@pytest.fixture(scope="module")
def bundle_state_dict() -> dict[str, torch.Tensor]:
    """A state_dict saved from MONAI's SwinUNETR as the btcv bundle builds it (fs48, 1 in, 14 out)."""
    torch.manual_seed(0)
    return SwinUNETR(in_channels=1, out_channels=14, feature_size=48).state_dict()


def test_bundle_key_layout(bundle_state_dict):
    assert len(bundle_state_dict) == 159  # the v1 layout documented for the bundle
    assert {k.split(".")[0] for k in bundle_state_dict} >= {"swinViT", "encoder1", "encoder10", "decoder1", "out"}


@pytest.mark.parametrize("wrapping", ["plain", "model", "module_prefix"])
def test_checkpoint_wrappings_are_unwrapped(tmp_path, bundle_state_dict, wrapping):
    state = bundle_state_dict
    if wrapping == "model":
        payload: object = {"model": state, "epoch": 5}
    elif wrapping == "module_prefix":
        payload = {"state_dict": {f"module.{k}": v for k, v in state.items()}}
    else:
        payload = state
    torch.save(payload, tmp_path / "model.pt")
    loaded = read_state_dict(tmp_path / "model.pt")
    assert loaded.keys() == state.keys()


def test_btcv_manifest_with_zoo_checkpoint_loads_and_runs(tmp_path, bundle_state_dict):
    folder = tmp_path / "btcv"
    folder.mkdir()
    shutil.copy(EXAMPLE, folder / "manifest.json")
    torch.save({"model": {f"module.{k}": v for k, v in bundle_state_dict.items()}}, folder / "model.pt")
    manifest = load_manifest(folder / "manifest.json")
    assert manifest.network["img_size"] == 96  # the stale bundle key is accepted and dropped
    predictor = Predictor(manifest, device="cpu")
    assert manifest.num_classes == 14
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    volume = Volume(np.random.default_rng(0).normal(0, 100, (40, 36, 24)).astype(np.float32), affine,
                    VolumeMetadata("random", "random"))
    result = segment_volume(volume, predictor)
    assert result.labels.shape == (40, 36, 24)
    assert result.labels.max() <= 13


def test_wrong_class_count_is_a_clear_error(tmp_path, bundle_state_dict):
    data = json.loads(EXAMPLE.read_text())
    data["labels"] = data["labels"][:5]
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    torch.save(bundle_state_dict, tmp_path / "model.pt")
    with pytest.raises(ModelError) as info:
        Predictor(load_manifest(tmp_path / "manifest.json"), device="cpu")
    assert info.value.code == "CHECKPOINT_INCOMPATIBLE"
    assert "out.conv.conv.bias: (14,) vs (6,)" in info.value.message


def test_v2_adds_eight_keys():
    manifest_data = json.loads(EXAMPLE.read_text())
    manifest_data["network"] = {"feature_size": 12, "use_v2": True}
    from models.manifest import manifest_from_dict

    v2 = build_network(manifest_from_dict(manifest_data)).state_dict()
    manifest_data["network"] = {"feature_size": 12}
    v1 = build_network(manifest_from_dict(manifest_data)).state_dict()
    assert len(v2) - len(v1) == 8


def test_unreadable_weights(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError) as info:
        read_state_dict(tmp_path / "model.pt")
    assert info.value.code == "WEIGHTS_UNREADABLE"
