"""Mamba with ``mamba_ssm.Mamba``'s parameters, on any device, and the U-Net's Mamba mixer.

:class:`Mamba` computes what ``mamba_ssm.modules.mamba_simple.Mamba`` computes on its reference path
(in_proj -> causal depthwise conv1d + SiLU -> x_proj -> dt_proj -> selective scan with softplus(dt + bias),
D skip and SiLU(z) gate -> out_proj) with the same parameter names and shapes, so its state dicts load with
``strict=True``. The scan goes through :func:`models.mamba_clinix.scan.selective_scan` (sequential,
chunked or mamba_ssm's CUDA kernel). Extra scan directions are optional, each with its own conv1d, x_proj,
dt_proj, A and D: ``reversed`` (suffix ``_b``, as in Vision Mamba) and ``slices`` (suffix ``_s``: tokens
ordered first spatial axis fastest, as in SegMamba's tri-oriented scan; needs the spatial shape).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.mamba_clinix.plan import DIRECTIONS, check_directions
from models.mamba_clinix.scan import selective_scan


class Mamba(nn.Module):
    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        directions: Sequence[str] = ("forward",),
    ) -> None:
        super().__init__()
        check_directions(list(directions))
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.directions = tuple(directions)
        self.in_proj = nn.Linear(d_model, self.d_inner * 2, bias=False)
        for direction in self.directions:
            self._add_direction(DIRECTIONS[direction], dt_min, dt_max, dt_init_floor)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    def _add_direction(self, suffix: str, dt_min: float, dt_max: float, dt_init_floor: float) -> None:
        inner, rank, state = self.d_inner, self.dt_rank, self.d_state
        conv = nn.Conv1d(inner, inner, kernel_size=self.d_conv, groups=inner, padding=self.d_conv - 1, bias=True)
        x_proj = nn.Linear(inner, rank + 2 * state, bias=False)
        dt_proj = nn.Linear(rank, inner, bias=True)
        # mamba_ssm's initialisation: dt weights keep the variance; softplus(dt bias) log-uniform in [dt_min, dt_max]
        nn.init.uniform_(dt_proj.weight, -(rank**-0.5), rank**-0.5)
        dt = torch.exp(torch.rand(inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        with torch.no_grad():
            dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
        A = torch.arange(1, state + 1, dtype=torch.float32).repeat(inner, 1)
        setattr(self, f"conv1d{suffix}", conv)
        setattr(self, f"x_proj{suffix}", x_proj)
        setattr(self, f"dt_proj{suffix}", dt_proj)
        # mamba_ssm names the forward parameters A_log and D; Vision Mamba the backward ones A_b_log and D_b
        self.register_parameter(f"A{suffix}_log", nn.Parameter(torch.log(A)))
        self.register_parameter(f"D{suffix}", nn.Parameter(torch.ones(inner)))

    def forward(self, hidden: torch.Tensor, spatial_shape: Sequence[int] | None = None) -> torch.Tensor:
        """``hidden`` (batch, L, d_model) -> (batch, L, d_model). ``spatial_shape``: the (D, H, W) that the
        tokens flatten (last axis fastest), needed by the ``slices`` direction."""
        length = hidden.shape[1]
        xz = self.in_proj(hidden).transpose(1, 2)  # (batch, 2 * d_inner, L)
        x, z = xz.chunk(2, dim=1)
        total = self._scan(x, z, "")
        if "reversed" in self.directions:
            total = total + self._scan(x.flip(-1), z.flip(-1), "_b").flip(-1)
        if "slices" in self.directions:
            if spatial_shape is None or math.prod(spatial_shape) != length:
                raise ValueError(f"the slices scan needs the spatial shape of the {length} tokens, got {spatial_shape}")
            depth, height, width = spatial_shape
            order = _slice_order((depth, height, width), hidden.device)
            total = total + self._scan(x[..., order], z[..., order], "_s")[..., torch.argsort(order)]
        y = total / len(self.directions)
        return self.out_proj(y.transpose(1, 2))

    def _scan(self, x: torch.Tensor, z: torch.Tensor, suffix: str) -> torch.Tensor:
        conv: nn.Conv1d = getattr(self, f"conv1d{suffix}")
        x_proj: nn.Linear = getattr(self, f"x_proj{suffix}")
        dt_proj: nn.Linear = getattr(self, f"dt_proj{suffix}")
        length = x.shape[-1]
        x = F.silu(conv(x)[..., :length])  # causal: the padding is on the left only once the tail is cut
        dt, B, C = x_proj(x.transpose(1, 2)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.linear(dt, dt_proj.weight).transpose(1, 2)  # bias goes into the scan as delta_bias
        A = -torch.exp(getattr(self, f"A{suffix}_log").float())
        D: torch.Tensor = getattr(self, f"D{suffix}")
        y = selective_scan(x, delta, A, B.transpose(1, 2), C.transpose(1, 2), D.float(), z=z,
                           delta_bias=dt_proj.bias.float(), delta_softplus=True)
        assert isinstance(y, torch.Tensor)
        return y


def _slice_order(shape: tuple[int, int, int], device: torch.device) -> torch.Tensor:
    """Token indices (last axis fastest) listed first axis fastest."""
    depth, height, width = shape
    return torch.arange(depth * height * width, device=device).view(depth, height, width).permute(2, 1, 0).reshape(-1)


class MambaMixer(nn.Module):
    """The U-Net's Mamba stage mixer: tokens -> LN -> Mamba -> the same LN -> Linear -> + x, in float32."""

    def __init__(self, channels: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 directions: Sequence[str] = ("forward",)) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.mamba = Mamba(channels, d_state=d_state, d_conv=d_conv, expand=expand, directions=directions)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, *spatial = x.shape
        # fp32 even under autocast: the scan's products underflow or turn NaN in half precision
        with torch.autocast(device_type=x.device.type, enabled=False):
            tokens = x.float().flatten(2).transpose(1, 2)  # (batch, DHW, C), last axis fastest
            mixed = self.proj(self.norm(self.mamba(self.norm(tokens), spatial)))
            out = mixed.transpose(1, 2).reshape(batch, channels, *spatial) + x.float()
        return out.to(x.dtype)
