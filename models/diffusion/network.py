"""The denoising UNet: MONAI's ``DiffusionModelUNet``, 3-D, input concat(noisy mask, image channels)."""

from __future__ import annotations

from typing import Any

from monai.networks.nets import DiffusionModelUNet
from torch import nn

from models.diffusion.settings import settings_with_defaults


def build_denoiser(in_channels: int, out_channels: int, settings: dict[str, Any]) -> nn.Module:
    """``in_channels`` image channels and ``out_channels`` classes (background included) from the manifest: the
    UNet sees the K = classes - 1 mask channels first, then the image, and returns K channels."""
    s = settings_with_defaults(settings)
    foreground = out_channels - 1
    return DiffusionModelUNet(spatial_dims=3, in_channels=foreground + in_channels, out_channels=foreground,
                              channels=tuple(s["channels"]), attention_levels=tuple(s["attention_levels"]),
                              num_res_blocks=int(s["num_res_blocks"]), norm_num_groups=int(s["norm_num_groups"]),
                              num_head_channels=int(s["num_head_channels"]))
