"""Reading checkpoints as other tools save them, and loading them into a network with clear errors."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from models.manifest import ModelManifest, file_sha256
from pipelines.errors import ModelError

log = logging.getLogger(__name__)

_WRAPPER_KEYS = ("model", "state_dict", "model_state_dict", "network_weights")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A plain state_dict from a checkpoint file.

    Accepts a bare state_dict or one wrapped as ``{"model": ...}`` / ``{"state_dict": ...}`` (MONAI
    bundles, Lightning, nnU-Net), and strips ``module.`` prefixes left by DataParallel/DDP.
    """
    try:
        loaded: Any = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise ModelError("WEIGHTS_NOT_FOUND", f"weights file {path} does not exist") from exc
    except Exception as exc:  # torch raises many types for a bad file
        raise ModelError("WEIGHTS_UNREADABLE", f"{path.name} is not a readable torch checkpoint ({exc})") from exc
    if isinstance(loaded, Mapping):
        for key in _WRAPPER_KEYS:
            if key in loaded and isinstance(loaded[key], Mapping):
                loaded = loaded[key]
                break
    if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ModelError("WEIGHTS_UNREADABLE", f"{path.name} holds no state_dict of tensors")
    return {_strip_prefix(k): v for k, v in loaded.items()}


def save_state_dict(state_dict: Mapping[str, torch.Tensor], path: Path, half: bool = False) -> None:
    """Save a plain state_dict; ``half`` stores floating tensors as float16 (about half the size).

    Loading casts them back to the network's dtype, so a half checkpoint runs in float32 as before.
    """
    tensors = {k: (v.detach().half() if half and v.is_floating_point() else v.detach()) for k, v in state_dict.items()}
    torch.save(tensors, path)


def _strip_prefix(key: str) -> str:
    while key.startswith("module."):
        key = key[len("module.") :]
    return key


def verify_weights(manifest: ModelManifest) -> str:
    """The weights' sha256, checked against the manifest when it states one."""
    path = manifest.weights_path
    if not path.is_file():
        raise ModelError("WEIGHTS_NOT_FOUND", f"weights file {path} for model '{manifest.name}' does not exist")
    digest = file_sha256(path)
    if manifest.weights.sha256 and digest != manifest.weights.sha256:
        raise ModelError(
            "WEIGHTS_CHECKSUM_MISMATCH",
            f"{path.name} has sha256 {digest[:12]}..., manifest '{manifest.name}' expects "
            f"{manifest.weights.sha256[:12]}...; re-download or re-register the weights",
        )
    if not manifest.weights.sha256:
        log.warning("model '%s' states no weights sha256; using unverified weights %s", manifest.name, digest[:12])
    return digest


def load_into(network: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], model_name: str) -> None:
    """Strict load that says which keys and shapes disagree instead of a wall of text."""
    own = network.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = sorted(k for k in own.keys() & state_dict.keys() if own[k].shape != state_dict[k].shape)
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if mismatched:
            key = mismatched[0]
            parts.append(
                f"{len(mismatched)} with other shapes (e.g. {key}: {tuple(state_dict[key].shape)} "
                f"vs {tuple(own[key].shape)})"
            )
        raise ModelError(
            "CHECKPOINT_INCOMPATIBLE",
            f"weights do not fit the network of '{model_name}': " + "; ".join(parts)
            + " - check the manifest's network settings, channels and labels",
        )
    network.load_state_dict(state_dict, strict=True)
