import json
import subprocess
import sys
from pathlib import Path

import pytest

from models.manifest import load_manifest, manifest_from_dict
from models.registry import DEFAULT_MODEL, list_manifests, register_model, resolve_model
from pipelines.errors import ModelError

ROOT = Path(__file__).resolve().parents[1]
BASE = {
    "name": "m", "family": "swin_unetr", "channels": [{"name": "CT", "modality": "CT"}],
    "labels": [{"value": 1, "name": "liver"}], "weights": {"path": "model.pt"},
}


def test_registry_lists_without_importing_torch():
    code = (
        "import sys; from models.registry import list_manifests; ms = list_manifests(); "
        "assert ms, 'no models'; assert 'torch' not in sys.modules, 'torch was imported'; "
        "print(','.join(m.name for m in ms))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert DEFAULT_MODEL in result.stdout


def test_default_model_manifest_is_complete():
    manifest = resolve_model(None)
    assert manifest.name == DEFAULT_MODEL
    assert manifest.weights.sha256 and len(manifest.weights.sha256) == 64
    assert manifest.weights_path.is_file()
    assert [lbl.name for lbl in manifest.labels] == ["liver", "spleen", "kidney_left", "kidney_right", "spine"]
    assert manifest.num_classes == 6
    assert all(side % 32 == 0 for side in manifest.inference.roi_size)


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"family": "unet9000"}, "family must be one of"),
        ({"labels": [{"value": 0, "name": "bg"}]}, "labels need distinct values >= 1"),
        ({"labels": [{"value": 1, "name": "a"}, {"value": 1, "name": "b"}]}, "labels need distinct values"),
        ({"channels": []}, "at least one input channel"),
        ({"inference": {"overlap": 1.0}}, "overlap must be in [0, 1), got 1.0"),
        ({"inference": {"roi_size": [96, 96]}}, "roi_size must be a number or 3 numbers"),
        ({"preprocessing": {"intensity": {"kind": "magic"}}}, "intensity.kind must be"),
        ({"inference": {"mirror_axes": [0, 3]}}, "mirror_axes must be distinct axes among 0, 1, 2, got [0, 3]"),
        ({"inference": {"mirror_axes": [1, 1]}}, "mirror_axes must be distinct axes"),
    ],
)
def test_invalid_manifests_are_refused_with_a_reason(change, fragment):
    with pytest.raises(ModelError) as info:
        manifest_from_dict({**BASE, **change})
    assert info.value.code == "MANIFEST_INVALID"
    assert fragment in info.value.message


def test_missing_field_is_named():
    data = dict(BASE)
    del data["weights"]
    with pytest.raises(ModelError, match="missing required field 'weights'"):
        manifest_from_dict(data)


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(ModelError) as info:
        resolve_model("no-such-model")
    assert info.value.code == "MODEL_NOT_FOUND"
    assert DEFAULT_MODEL in info.value.message


def test_manifest_file_errors(tmp_path):
    with pytest.raises(ModelError) as info:
        load_manifest(tmp_path / "absent.json")
    assert info.value.code == "MANIFEST_NOT_FOUND"
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ModelError) as info:
        load_manifest(bad)
    assert info.value.code == "MANIFEST_INVALID"


def test_register_copies_weights_and_verifies_checksum(tmp_path, monkeypatch, tiny_model):
    monkeypatch.setenv("TESSERA_HOME", str(tmp_path / "home"))
    registered = register_model(tiny_model.manifest_path)
    assert registered.weights_path.parent == tmp_path / "home" / "models" / "tiny"
    assert registered.weights.sha256 == tiny_model.weights.sha256
    assert "tiny" in {m.name for m in list_manifests()}
    with pytest.raises(ModelError) as info:
        register_model(tiny_model.manifest_path)
    assert info.value.code == "MODEL_EXISTS"
    # A manifest whose checksum does not match its weights is refused.
    data = json.loads(tiny_model.manifest_path.read_text())
    data["weights"] = {"path": str(tiny_model.weights_path), "sha256": "0" * 64}
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps(data))
    with pytest.raises(ModelError) as info:
        register_model(wrong, overwrite=True)
    assert info.value.code == "WEIGHTS_CHECKSUM_MISMATCH"
