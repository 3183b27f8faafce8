"""The MambaClinix stage plan and the checks of its settings, without torch (manifests are checked torch-free)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pipelines.errors import ModelError

GATINGS = ("add", "mul")
DIRECTIONS = {"forward": "", "reversed": "_b", "slices": "_s"}  # scan direction -> parameter name suffix


def order_widths(channels: int, order: int) -> list[int]:
    """The widths d_0..d_(k-1) of an order-k hierarchical gated convolution on ``channels`` channels:
    C' = C/2 and d_i = C' / 2^(k-1-i); MANIFEST_INVALID when they are not whole numbers."""
    if order < 1 or channels % 2 or (channels // 2) % (2 ** (order - 1)):
        raise ModelError("MANIFEST_INVALID", f"HGCN order {order} does not divide {channels} channels "
                                             f"(C/2 = {channels / 2:g} must be a multiple of 2^(order-1) = "
                                             f"{2 ** (order - 1)})")
    half = channels // 2
    return [half // 2 ** (order - 1 - i) for i in range(order)]


def check_directions(directions: list[str]) -> None:
    if not directions or directions[0] != "forward" or not set(directions) <= set(DIRECTIONS) \
            or len(set(directions)) != len(directions):
        raise ModelError("MANIFEST_INVALID", f"scan_directions must start with 'forward' and may add 'reversed' and "
                                             f"'slices' once each, got {directions}")


DEFAULTS: dict[str, Any] = {
    "base_channels": 32,
    "max_channels": 320,
    "stages": None,  # planned from the window when not given
    "gating": "add",
    "scan_directions": ["forward"],
    "hgcn_orders": None,  # 2, 3, 4, ... by stage
    "d_state": 16,
    "d_conv": 4,
    "expand": 2,
    "drop_path": 0.5,
    "layer_scale": 1e-6,
    "deep_supervision": True,
}
MIN_BOTTLENECK = 4  # plan no stage whose grid would be smaller than this on its shortest side
MAX_STAGES = 7


@dataclass(frozen=True)
class StagePlan:
    channels: tuple[int, ...]
    mixers: tuple[str, ...]  # "hgcn" or "mamba" per stage
    orders: tuple[int, ...]  # HGCN order per HGCN stage
    drop_path: tuple[float, ...]

    @property
    def stages(self) -> int:
        return len(self.channels)

    @property
    def downsampling(self) -> int:
        return 2 ** (self.stages - 1)


def planned_stages(window: tuple[int, int, int]) -> int:
    """Halve while every side stays divisible and the shortest stays >= 4: 5 stages for 96^3, 6 for 128^3."""
    stages = 1
    while stages < MAX_STAGES and all(side % 2**stages == 0 for side in window) \
            and min(window) // 2**stages >= MIN_BOTTLENECK:
        stages += 1
    return stages


def settings_with_defaults(settings: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(settings) - set(DEFAULTS))
    if unknown:
        raise ModelError("MANIFEST_INVALID", f"unknown MambaClinix network settings {unknown} "
                                             f"(known: {sorted(DEFAULTS)})")
    return {**DEFAULTS, **settings}


def resolve_settings(settings: dict[str, Any], roi: tuple[int, int, int]) -> dict[str, Any]:
    """The settings with the stage count fixed from the roi, so that a manifest states its network exactly."""
    full = settings_with_defaults(settings)
    return {**settings, "stages": int(full["stages"] or planned_stages(roi))}


def plan(settings: dict[str, Any], window: tuple[int, int, int]) -> StagePlan:
    """The stage plan, every setting checked: MANIFEST_INVALID names the value that cannot work."""
    s = settings_with_defaults(settings)
    stages = int(s["stages"] or planned_stages(window))
    if not 2 <= stages <= MAX_STAGES:
        raise ModelError("MANIFEST_INVALID", f"MambaClinix stages must be in [2, {MAX_STAGES}], got {stages}")
    base, top = int(s["base_channels"]), int(s["max_channels"])
    if base < 2 or top < base:
        raise ModelError("MANIFEST_INVALID", f"need 2 <= base_channels <= max_channels, got {base} and {top}")
    if s["gating"] not in GATINGS:
        raise ModelError("MANIFEST_INVALID", f"gating must be one of {GATINGS}, got {s['gating']!r}")
    check_directions(list(s["scan_directions"]))
    channels = tuple(min(base * 2**i, top) for i in range(stages))
    shallow = math.ceil(stages / 2)
    orders = tuple(s["hgcn_orders"] or range(2, 2 + shallow))
    if len(orders) != shallow:
        raise ModelError("MANIFEST_INVALID", f"hgcn_orders needs one order per HGCN stage ({shallow}), got "
                                             f"{list(orders)}")
    for stage, order in enumerate(orders):
        order_widths(channels[stage], int(order))  # raises MANIFEST_INVALID naming order and channels
    top_drop = float(s["drop_path"])
    drop = tuple(top_drop * i / (stages - 1) for i in range(stages))
    return StagePlan(channels, tuple("hgcn" if i < shallow else "mamba" for i in range(stages)),
                     tuple(int(o) for o in orders), drop)


def check_window(window: tuple[int, int, int], settings: dict[str, Any], what: str = "roi_size") -> None:
    """A window (inference roi or training crop) every stage can halve: sides divisible by 2^(stages-1)."""
    stage_plan = plan(settings, window)
    factor = stage_plan.downsampling
    if any(side % factor for side in window):
        raise ModelError("MANIFEST_INVALID", f"MambaClinix {what} {tuple(window)} is not divisible by the stage "
                                             f"strides ({stage_plan.stages} stages halve it {stage_plan.stages - 1} "
                                             f"times: sides must be multiples of {factor})")
