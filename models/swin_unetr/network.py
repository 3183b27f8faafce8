"""The Swin-UNETR family on MONAI's ``SwinUNETR`` (v1 and v2)."""

from __future__ import annotations

import logging
from typing import Any

from monai.networks.nets import SwinUNETR
from torch import nn

from pipelines.errors import ModelError

log = logging.getLogger(__name__)

_ACCEPTED = {
    "feature_size", "use_v2", "depths", "num_heads", "drop_rate", "attn_drop_rate",
    "dropout_path_rate", "normalize", "use_checkpoint", "norm_name", "downsample",
}
# Keys that MONAI bundles still carry but the current constructor refuses.
_STALE = {"img_size", "spatial_dims"}


def build_swin_unetr(in_channels: int, out_channels: int, settings: dict[str, Any]) -> nn.Module:
    stale = sorted(set(settings) & _STALE)
    if stale:
        log.info("ignoring stale Swin-UNETR settings %s (sizes come from the input)", stale)
    unknown = sorted(set(settings) - _ACCEPTED - _STALE)
    if unknown:
        raise ModelError("MANIFEST_INVALID", f"unknown Swin-UNETR network settings {unknown}")
    kwargs = {k: v for k, v in settings.items() if k in _ACCEPTED}
    for key in ("depths", "num_heads"):
        if key in kwargs:
            kwargs[key] = tuple(kwargs[key])
    feature_size = int(kwargs.get("feature_size", 48))
    if feature_size % 12:
        raise ModelError("MANIFEST_INVALID", f"Swin-UNETR feature_size must be a multiple of 12, got {feature_size}")
    return SwinUNETR(in_channels=in_channels, out_channels=out_channels, spatial_dims=3, **kwargs)
