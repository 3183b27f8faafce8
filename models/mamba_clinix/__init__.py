"""The MambaClinix-style hybrid family: HGCN + Mamba U-Net, region-specific Tversky loss, our own scan.

This module is the family's entry and imports no torch; the network code loads when a network is built.
"""

from __future__ import annotations

import argparse
from typing import Any

from models.families import Family, TrainingRecipe
from models.mamba_clinix.plan import check_window, resolve_settings


def _build(in_channels: int, out_channels: int, settings: dict[str, Any], roi: tuple[int, int, int]) -> Any:
    from models.mamba_clinix.network import MambaClinixUNet

    return MambaClinixUNet(in_channels, out_channels, settings, roi)


def _runtime_info() -> dict[str, Any]:
    from models.mamba_clinix.scan import backends_used

    return {"scan_backends": backends_used(reset=True)}


def _add_train_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--base-channels", type=int, default=16, help="channels of the first stage (reference: 32)")
    group.add_argument("--max-channels", type=int, default=128, help="channel cap (reference: 320)")
    group.add_argument("--stages", type=int, default=None, help="U-Net stages (default: planned from --roi)")
    group.add_argument("--gating", choices=("add", "mul"), default="add",
                       help="HGCN combination: add (released code) or mul (HorNet gnConv)")
    group.add_argument("--scan-directions", default="forward",
                       help="Mamba scan directions: forward, plus reversed and/or slices (comma-separated)")


def _network_from_args(args: argparse.Namespace) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "base_channels": args.base_channels, "max_channels": args.max_channels, "gating": args.gating,
        "scan_directions": [d.strip() for d in args.scan_directions.split(",") if d.strip()],
    }
    if args.stages:
        settings["stages"] = args.stages
    return settings


FAMILY = Family(
    name="mamba_clinix",
    title="MambaClinix-style HGCN + Mamba U-Net",
    build=_build,
    check_window=check_window,
    add_train_arguments=_add_train_arguments,
    network_from_args=_network_from_args,
    resolve_settings=resolve_settings,
    default_loss="compound",
    # the paper's nnU-Net trainer: Adam 1e-4, weight decay 1e-5, poly 0.9
    reference_recipe=TrainingRecipe(optimizer="adam", learning_rate=1e-4, weight_decay=1e-5, schedule="poly"),
    runtime_info=_runtime_info,
)

__all__ = ["FAMILY"]
