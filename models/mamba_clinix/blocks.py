"""Convolutional pieces of the MambaClinix-style U-Net: ResNet-D residual blocks and HGCN blocks."""

from __future__ import annotations

import torch
from monai.networks.layers import DropPath
from torch import nn

from models.mamba_clinix.plan import GATINGS, order_widths
from pipelines.errors import ModelError


def conv_norm_act(in_ch: int, out_ch: int, stride: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv3d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False),
                               nn.InstanceNorm3d(out_ch, affine=True)]
    if act:
        layers.append(nn.LeakyReLU(0.01, inplace=True))
    return nn.Sequential(*layers)


class ResidualBlockD(nn.Module):
    """conv-IN-LReLU-conv-IN plus a ResNet-D skip (average pooling, 1x1 conv, IN), then LReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv_norm_act(in_ch, out_ch, stride)
        self.conv2 = conv_norm_act(out_ch, out_ch, act=False)
        skip: list[nn.Module] = []
        if stride != 1:
            skip.append(nn.AvgPool3d(stride, stride))
        if stride != 1 or in_ch != out_ch:
            skip += [nn.Conv3d(in_ch, out_ch, 1, bias=False), nn.InstanceNorm3d(out_ch, affine=True)]
        self.skip = nn.Sequential(*skip)
        self.act = nn.LeakyReLU(0.01, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.skip(x))


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of each voxel of a (batch, C, D, H, W) tensor."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        shape = (1, -1, 1, 1, 1)
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight.view(shape) + self.bias.view(shape)


class HierarchicalGatedConv(nn.Module):
    """hgConv of order k: 1x1 to 2C', split into p0 (d_0) and q (sum d_i), depthwise 3^3 on q, split q into
    q_0..q_(k-1); u_0 = p0 (+) q_0, u_(i+1) = 1x1(u_i) (+) q_(i+1); out = 1x1(u_(k-1)).
    (+) is addition (the released MambaClinix code) or multiplication (HorNet's gnConv)."""

    def __init__(self, channels: int, order: int, gating: str = "add") -> None:
        super().__init__()
        if gating not in GATINGS:
            raise ModelError("MANIFEST_INVALID", f"gating must be one of {GATINGS}, got {gating!r}")
        self.widths = order_widths(channels, order)
        self.gating = gating
        total = sum(self.widths)
        self.proj_in = nn.Conv3d(channels, self.widths[0] + total, 1)
        self.dwconv = nn.Conv3d(total, total, 3, padding=1, groups=total)
        self.pws = nn.ModuleList(nn.Conv3d(self.widths[i], self.widths[i + 1], 1) for i in range(order - 1))
        self.proj_out = nn.Conv3d(self.widths[-1], channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, q = self.proj_in(x).split([self.widths[0], sum(self.widths)], dim=1)
        parts = self.dwconv(q).split(self.widths, dim=1)
        u = self._combine(p, parts[0])
        for pw, part in zip(self.pws, parts[1:], strict=True):
            u = self._combine(pw(u), part)
        return self.proj_out(u)

    def _combine(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b if self.gating == "add" else a * b


class HGCNBlock(nn.Module):
    """t0 = 1x1(x); t1 = t0 + droppath(gamma * hgConv(LN(t0))); out = x + droppath(conv3(LReLU(conv3(LN(t1)))))
    with layer scale gamma (init 1e-6)."""

    def __init__(self, channels: int, order: int, drop_path: float = 0.0, gating: str = "add",
                 layer_scale: float = 1e-6) -> None:
        super().__init__()
        self.proj = nn.Conv3d(channels, channels, 1)
        self.norm1 = ChannelLayerNorm(channels)
        self.hgconv = HierarchicalGatedConv(channels, order, gating)
        self.gamma = nn.Parameter(torch.full((1, channels, 1, 1, 1), float(layer_scale)))
        self.norm2 = ChannelLayerNorm(channels)
        self.ffn = nn.Sequential(nn.Conv3d(channels, channels, 3, padding=1), nn.LeakyReLU(0.01, inplace=True),
                                 nn.Conv3d(channels, channels, 3, padding=1))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t0 = self.proj(x)
        t1 = t0 + self.drop_path(self.gamma * self.hgconv(self.norm1(t0)))
        return x + self.drop_path(self.ffn(self.norm2(t1)))
