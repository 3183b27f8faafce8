"""The MambaClinix-style U-Net: HGCN mixers in the shallow stages, Mamba in the deep ones.

Stage s (of n, planned from the window) has min(base * 2^s, max) channels and stride 1 then 2: one ResNet-D
residual block followed by one mixer, an HGCN block of order 2, 3, 4... for s < ceil(n/2) (drop-path
linspace(0, drop_path, n)[s]; a channel LayerNorm before the last one), a Mamba mixer deeper down (at most
4096 tokens for a 128^3 window). The decoder is residual (transposed-conv up, concatenate the skip, one residual
block) with a 1x1 head at every level: in training it returns n-1 outputs, full resolution first (deep
supervision); in eval mode only the full-resolution logits.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from models.mamba_clinix.blocks import ChannelLayerNorm, HGCNBlock, ResidualBlockD
from models.mamba_clinix.mamba import MambaMixer
from models.mamba_clinix.plan import plan, settings_with_defaults


class MambaClinixUNet(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, settings: dict[str, Any],
                 window: tuple[int, int, int]) -> None:
        super().__init__()
        s = settings_with_defaults(settings)
        self.plan = stage_plan = plan(settings, window)
        self.deep_supervision = bool(s["deep_supervision"])
        channels = stage_plan.channels
        self.encoder = nn.ModuleList()
        hgcn_stages = len(stage_plan.orders)
        for i, width in enumerate(channels):
            layers: list[nn.Module] = [ResidualBlockD(in_channels if i == 0 else channels[i - 1], width,
                                                      stride=1 if i == 0 else 2)]
            if stage_plan.mixers[i] == "hgcn":
                if i == hgcn_stages - 1:
                    layers.append(ChannelLayerNorm(width))
                layers.append(HGCNBlock(width, stage_plan.orders[i], stage_plan.drop_path[i], s["gating"],
                                        float(s["layer_scale"])))
            else:
                layers.append(MambaMixer(width, int(s["d_state"]), int(s["d_conv"]), int(s["expand"]),
                                         tuple(s["scan_directions"])))
            self.encoder.append(nn.Sequential(*layers))
        # decoder level j joins stage j+1's output to stage j's skip (deepest first when running)
        self.up = nn.ModuleList(nn.ConvTranspose3d(channels[j + 1], channels[j], 2, stride=2, bias=False)
                                for j in range(len(channels) - 1))
        self.decode = nn.ModuleList(ResidualBlockD(2 * channels[j], channels[j]) for j in range(len(channels) - 1))
        self.heads = nn.ModuleList(nn.Conv3d(channels[j], out_channels, 1) for j in range(len(channels) - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        supervise = self.training and self.deep_supervision
        outputs: list[torch.Tensor] = []
        for j in reversed(range(len(self.up))):
            x = self.decode[j](torch.cat([self.up[j](x), skips[j]], dim=1))
            if supervise or j == 0:
                outputs.append(self.heads[j](x))
        return outputs[::-1] if supervise else outputs[-1]
