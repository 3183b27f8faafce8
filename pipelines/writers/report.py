"""The label table and the machine-readable run report of one case."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import monai
import nibabel as nib
import numpy as np
import torch

from models.manifest import ModelManifest


def label_table(manifest: ModelManifest) -> dict[str, Any]:
    """``labels.json``: what each value of the mask means."""
    return {
        "model": manifest.name,
        "model_version": manifest.version,
        "labels": {"0": "background", **{str(lbl.value): lbl.name for lbl in manifest.labels}},
        "details": [
            {"value": lbl.value, "name": lbl.name, "color": list(lbl.color) if lbl.color else None, "code": lbl.code}
            for lbl in manifest.labels
        ],
    }


def software_versions() -> dict[str, str]:
    from app import __version__

    return {
        "tessera": __version__,
        "torch": torch.__version__,
        "monai": monai.__version__,
        "nibabel": nib.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def write_json(data: dict[str, Any], path: Path) -> Path:
    path.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
