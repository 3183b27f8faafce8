"""Where models are found: shipped ones, the user's model folder, and extra paths.

Listing the registry reads JSON manifests only; it never imports torch.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from models.manifest import ModelManifest, file_sha256, load_manifest
from pipelines.errors import ModelError

log = logging.getLogger(__name__)

SHIPPED_DIR = Path(__file__).parent / "weights"
DEFAULT_MODEL = "swin-unetr-phantom"
MANIFEST_NAME = "manifest.json"


def user_models_dir() -> Path:
    """``$TESSERA_HOME/models`` (default ``~/.local/share/tessera/models``)."""
    home = os.environ.get("TESSERA_HOME") or Path.home() / ".local" / "share" / "tessera"
    return Path(home) / "models"


def search_dirs() -> list[Path]:
    extra = [Path(p) for p in os.environ.get("TESSERA_MODELS_PATH", "").split(os.pathsep) if p]
    return [SHIPPED_DIR, user_models_dir(), *extra]


def list_manifests() -> list[ModelManifest]:
    """Every valid manifest in the search path; the first of a name wins (shipped first)."""
    found: dict[str, ModelManifest] = {}
    for root in search_dirs():
        if not root.is_dir():
            continue
        for path in sorted(root.glob(f"*/{MANIFEST_NAME}")):
            try:
                manifest = load_manifest(path)
            except ModelError as exc:
                log.warning("skipping %s", exc)
                continue
            found.setdefault(manifest.name, manifest)
    return sorted(found.values(), key=lambda m: m.name)


def resolve_model(name_or_path: str | None) -> ModelManifest:
    """A registered model by name, or a manifest file given by path; ``None`` is the default model."""
    name = name_or_path or DEFAULT_MODEL
    candidate = Path(name).expanduser()
    if name.endswith(".json") or candidate.is_file():
        return load_manifest(candidate)
    if candidate.is_dir() and (candidate / MANIFEST_NAME).is_file():
        return load_manifest(candidate / MANIFEST_NAME)
    manifests = {m.name: m for m in list_manifests()}
    if name not in manifests:
        known = ", ".join(sorted(manifests)) or "none"
        raise ModelError("MODEL_NOT_FOUND", f"no model named '{name}' (registered: {known})")
    return manifests[name]


def register_model(manifest_path: str | Path, *, overwrite: bool = False) -> ModelManifest:
    """Copy a manifest and its weights into the user's model folder, checking the weights' sha256.

    The manifest keeps its checksum; one is computed and written when it has none.
    """
    manifest = load_manifest(manifest_path)
    weights = manifest.weights_path
    if not weights.is_file():
        raise ModelError("WEIGHTS_NOT_FOUND", f"weights file {weights} does not exist")
    digest = file_sha256(weights)
    if manifest.weights.sha256 and manifest.weights.sha256 != digest:
        raise ModelError(
            "WEIGHTS_CHECKSUM_MISMATCH",
            f"{weights.name} has sha256 {digest[:12]}..., the manifest says {manifest.weights.sha256[:12]}...",
        )
    target = user_models_dir() / manifest.name
    if target.exists() and not overwrite:
        raise ModelError("MODEL_EXISTS", f"a model named '{manifest.name}' is already registered at {target}")
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy2(weights, target / weights.name)
    data = manifest.to_json()
    data["weights"] = {"path": weights.name, "sha256": digest}
    (target / MANIFEST_NAME).write_text(json.dumps(data, indent=2) + "\n")
    return load_manifest(target / MANIFEST_NAME)
