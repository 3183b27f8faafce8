"""The Swin-UNETR family (MONAI ``SwinUNETR``, v1 and v2). This entry imports no torch."""

from __future__ import annotations

import argparse
from typing import Any

from models.families import Family
from pipelines.errors import ModelError


def _build(in_channels: int, out_channels: int, settings: dict[str, Any], roi: tuple[int, int, int]) -> Any:
    from models.swin_unetr.network import build_swin_unetr

    return build_swin_unetr(in_channels, out_channels, settings)


def check_roi(roi_size: tuple[int, int, int], what: str = "roi_size") -> None:
    """Swin-UNETR halves the grid five times: sides divisible by 32, and a bottleneck of more than 1 voxel
    (at 32^3 it is 1^3 and instance normalisation fails while training)."""
    if any(side % 32 for side in roi_size):
        raise ModelError("MANIFEST_INVALID", f"Swin-UNETR {what} sides must be multiples of 32, got {tuple(roi_size)}")
    if all(side == 32 for side in roi_size):
        raise ModelError("MANIFEST_INVALID", f"Swin-UNETR {what} of 32^3 leaves a 1^3 bottleneck; use 64 on one side")



def _add_train_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--feature-size", type=int, default=12, help="Swin-UNETR feature size (multiple of 12)")
    group.add_argument("--depths", type=lambda t: [int(p) for p in t.split(",")], default=[1, 1, 1, 1],
                       help="Swin depths per stage, e.g. 2,2,2,2")
    group.add_argument("--v2", action="store_true", help="Swin-UNETR v2 (residual conv blocks per stage)")


def _network_from_args(args: argparse.Namespace) -> dict[str, Any]:
    return {"feature_size": args.feature_size, "use_v2": bool(args.v2), "depths": args.depths}


FAMILY = Family(
    name="swin_unetr",
    title="Swin-UNETR",
    build=_build,
    check_window=lambda size, settings, what: check_roi(size, what),
    add_train_arguments=_add_train_arguments,
    network_from_args=_network_from_args,
)

__all__ = ["FAMILY", "check_roi"]
