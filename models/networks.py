"""Network factories: a manifest in, an ``nn.Module`` with its weights out (any family)."""

from __future__ import annotations

from torch import nn

from models.checkpoints import load_into, read_state_dict, verify_weights
from models.families import get_family
from models.manifest import ModelManifest


def build_network(manifest: ModelManifest) -> nn.Module:
    """An untrained network of the manifest's family and shape; MANIFEST_INVALID for impossible settings."""
    family = get_family(manifest.family)
    roi = manifest.inference.roi_size
    family.check_window(roi, manifest.network, "roi_size")
    return family.build(len(manifest.channels), manifest.num_classes, manifest.network, roi)


def load_network(manifest: ModelManifest) -> tuple[nn.Module, str]:
    """The network with its verified weights, in eval mode, and the weights' sha256."""
    digest = verify_weights(manifest)
    network = build_network(manifest)
    load_into(network, read_state_dict(manifest.weights_path), manifest.name)
    return network.eval(), digest
