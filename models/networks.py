"""Network factories: a manifest in, an ``nn.Module`` with its weights out."""

from __future__ import annotations

from torch import nn

from models.checkpoints import load_into, read_state_dict, verify_weights
from models.manifest import ModelManifest
from models.swin_unetr import build_swin_unetr, check_roi
from pipelines.errors import ModelError


def build_network(manifest: ModelManifest) -> nn.Module:
    """An untrained network of the manifest's family and shape."""
    if manifest.family == "swin_unetr":
        check_roi(manifest.inference.roi_size)
        return build_swin_unetr(len(manifest.channels), manifest.num_classes, manifest.network)
    raise ModelError("MANIFEST_INVALID", f"no network factory for family '{manifest.family}'")


def load_network(manifest: ModelManifest) -> tuple[nn.Module, str]:
    """The network with its verified weights, in eval mode, and the weights' sha256."""
    digest = verify_weights(manifest)
    network = build_network(manifest)
    load_into(network, read_state_dict(manifest.weights_path), manifest.name)
    return network.eval(), digest
