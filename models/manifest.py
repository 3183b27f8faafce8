"""Model manifests: everything needed to run a model, readable without importing torch."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from models.families import FAMILIES
from pipelines.errors import ModelError


@dataclass(frozen=True)
class Channel:
    name: str
    modality: str


@dataclass(frozen=True)
class Label:
    value: int
    name: str
    color: tuple[int, int, int] | None = None
    # Coded concept for DICOM-SEG: {"scheme": "SCT", "value": "10200004", "meaning": "Liver"}
    code: dict[str, str] | None = None


@dataclass(frozen=True)
class IntensitySpec:
    """``window``: clip [a_min, a_max] to [b_min, b_max] (CT HU); ``zscore``: per-channel over nonzero."""

    kind: str = "window"
    a_min: float = -1000.0
    a_max: float = 1000.0
    b_min: float = 0.0
    b_max: float = 1.0
    clip: bool = True


@dataclass(frozen=True)
class PreprocessingSpec:
    orientation: str = "RAS"
    spacing: tuple[float, float, float] | None = None
    intensity: IntensitySpec = field(default_factory=IntensitySpec)


@dataclass(frozen=True)
class InferenceSpec:
    roi_size: tuple[int, int, int] = (96, 96, 96)
    overlap: float = 0.25
    mode: str = "gaussian"
    sw_batch_size: int = 2
    # test-time mirroring along these model-grid axes (RAS: 0 = left-right): window families average each window's
    # output over every combination of flips, families that sample mirror the image for alternate ensemble members
    mirror_axes: tuple[int, ...] = ()


@dataclass(frozen=True)
class WeightsSpec:
    path: str
    sha256: str | None = None


@dataclass(frozen=True)
class ModelManifest:
    name: str
    version: str
    family: str
    channels: tuple[Channel, ...]
    labels: tuple[Label, ...]
    preprocessing: PreprocessingSpec
    inference: InferenceSpec
    weights: WeightsSpec
    network: dict[str, Any] = field(default_factory=dict)
    keep_largest_component: tuple[int, ...] = ()
    description: str = ""
    intended_use: str = ""
    training: dict[str, Any] = field(default_factory=dict)
    manifest_path: Path | None = None

    @property
    def num_classes(self) -> int:
        """Output channels of the network: background plus every label."""
        return max(label.value for label in self.labels) + 1

    @property
    def weights_path(self) -> Path:
        path = Path(self.weights.path).expanduser()
        if not path.is_absolute() and self.manifest_path is not None:
            path = self.manifest_path.parent / path
        return path

    def label_names(self) -> dict[int, str]:
        return {label.value: label.name for label in self.labels}

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("manifest_path")
        return data


def _require(data: dict[str, Any], key: str, where: str) -> Any:
    if key not in data:
        raise ModelError("MANIFEST_INVALID", f"{where}: missing required field '{key}'")
    return data[key]


def _triple(value: Any, what: str, where: str) -> tuple[Any, Any, Any]:
    if isinstance(value, (int, float)):
        return (value, value, value)
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise ModelError("MANIFEST_INVALID", f"{where}: {what} must be a number or 3 numbers, got {value!r}")
    return (value[0], value[1], value[2])


def valid_mirror_axes(axes: tuple[int, ...]) -> bool:
    """Mirror axes are distinct spatial axes of the model grid: each 0, 1 or 2, once."""
    return set(axes) <= {0, 1, 2} and len(set(axes)) == len(axes)


def manifest_from_dict(data: dict[str, Any], manifest_path: Path | None = None) -> ModelManifest:
    """Validate a manifest dictionary up front and build a :class:`ModelManifest`."""
    where = str(manifest_path) if manifest_path else "manifest"
    family = _require(data, "family", where)
    if family not in FAMILIES:
        raise ModelError("MANIFEST_INVALID", f"{where}: family must be one of {FAMILIES}, got {family!r}")
    channels = tuple(Channel(**c) for c in _require(data, "channels", where))
    if not channels:
        raise ModelError("MANIFEST_INVALID", f"{where}: at least one input channel is required")
    labels = tuple(
        Label(
            value=int(item["value"]),
            name=str(item["name"]),
            color=tuple(item["color"]) if item.get("color") else None,  # type: ignore[arg-type]
            code=item.get("code"),
        )
        for item in _require(data, "labels", where)
    )
    values = [label.value for label in labels]
    if not labels or min(values) < 1 or len(set(values)) != len(values):
        raise ModelError("MANIFEST_INVALID", f"{where}: labels need distinct values >= 1, got {values}")
    pre = data.get("preprocessing", {})
    spacing = pre.get("spacing")
    preprocessing = PreprocessingSpec(
        orientation=str(pre.get("orientation", "RAS")),
        spacing=tuple(float(s) for s in _triple(spacing, "spacing", where)) if spacing else None,  # type: ignore[arg-type]
        intensity=IntensitySpec(**pre.get("intensity", {})),
    )
    if preprocessing.intensity.kind not in ("window", "zscore", "none"):
        raise ModelError(
            "MANIFEST_INVALID",
            f"{where}: intensity.kind must be window, zscore or none, got {preprocessing.intensity.kind!r}",
        )
    inf = data.get("inference", {})
    inference = InferenceSpec(
        roi_size=tuple(int(r) for r in _triple(inf.get("roi_size", 96), "roi_size", where)),  # type: ignore[arg-type]
        overlap=float(inf.get("overlap", 0.25)),
        mode=str(inf.get("mode", "gaussian")),
        sw_batch_size=int(inf.get("sw_batch_size", 2)),
        mirror_axes=tuple(int(a) for a in inf.get("mirror_axes", ())),
    )
    if not 0.0 <= inference.overlap < 1.0:
        raise ModelError("MANIFEST_INVALID", f"{where}: overlap must be in [0, 1), got {inference.overlap}")
    if not valid_mirror_axes(inference.mirror_axes):
        raise ModelError("MANIFEST_INVALID", f"{where}: mirror_axes must be distinct axes among 0, 1, 2, got "
                                             f"{list(inference.mirror_axes)}")
    weights = WeightsSpec(**_require(data, "weights", where))
    return ModelManifest(
        name=str(_require(data, "name", where)),
        version=str(data.get("version", "0")),
        family=family,
        channels=channels,
        labels=labels,
        preprocessing=preprocessing,
        inference=inference,
        weights=weights,
        network=dict(data.get("network", {})),
        keep_largest_component=tuple(int(v) for v in data.get("keep_largest_component", ())),
        description=str(data.get("description", "")),
        intended_use=str(data.get("intended_use", "")),
        training=dict(data.get("training", {})),
        manifest_path=manifest_path,
    )


def load_manifest(path: str | Path) -> ModelManifest:
    path = Path(path).expanduser().resolve()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ModelError("MANIFEST_NOT_FOUND", f"no manifest at {path}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError("MANIFEST_INVALID", f"{path} is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ModelError("MANIFEST_INVALID", f"{path}: expected a JSON object")
    try:
        return manifest_from_dict(data, manifest_path=path)
    except (TypeError, KeyError, ValueError) as exc:
        raise ModelError("MANIFEST_INVALID", f"{path}: {exc}") from exc


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
