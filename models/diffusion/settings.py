"""The diffusion family's manifest settings and their checks, without torch."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipelines.errors import ModelError, UsageError

MAX_MEMBERS = 64  # a run's ensemble bound: members travel together through the engine, memory grows with them

DEFAULTS: dict[str, Any] = {
    # DiffusionModelUNet
    "channels": [16, 32, 64],
    "attention_levels": None,  # attention at the last level only
    "num_res_blocks": 1,
    "norm_num_groups": 8,
    "num_head_channels": 8,
    # DDPM training
    "prediction_type": "epsilon",
    "train_steps": 1000,
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "mask_loss_weight": 1.0,  # with prediction_type "sample": weight of Dice + BCE on the predicted mask
    # sampling (GPU defaults; the CPU budget below applies on the CPU)
    "steps": 50,
    "members": 5,
    "cpu_steps": 10,
    "cpu_members": 3,
    "eta": 0.0,
    "seed": 0,
}


def settings_with_defaults(settings: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(settings) - set(DEFAULTS))
    if unknown:
        raise ModelError("MANIFEST_INVALID", f"unknown diffusion settings {unknown} (known: {sorted(DEFAULTS)})")
    full = {**DEFAULTS, **settings}
    channels = [int(c) for c in full["channels"]]
    groups = int(full["norm_num_groups"])
    if not channels or any(c % groups for c in channels):
        raise ModelError("MANIFEST_INVALID", f"every entry of channels {channels} must be a multiple of "
                                             f"norm_num_groups ({groups})")
    levels = full["attention_levels"] or [i == len(channels) - 1 for i in range(len(channels))]
    if len(levels) != len(channels):
        raise ModelError("MANIFEST_INVALID", f"attention_levels {levels} needs one entry per level of {channels}")
    if full["prediction_type"] not in ("epsilon", "sample"):
        raise ModelError("MANIFEST_INVALID", f"prediction_type must be epsilon or sample, got "
                                             f"{full['prediction_type']!r}")
    for key in ("steps", "cpu_steps"):
        if not 1 <= int(full[key]) <= int(full["train_steps"]):
            raise ModelError("MANIFEST_INVALID", f"{key} must be in [1, {full['train_steps']}], got {full[key]}")
    for key in ("members", "cpu_members"):
        if int(full[key]) < 1:
            raise ModelError("MANIFEST_INVALID", f"{key} must be >= 1, got {full[key]}")
    return {**full, "channels": channels, "attention_levels": [bool(v) for v in levels]}


def check_window(window: tuple[int, int, int], settings: dict[str, Any], what: str = "roi_size") -> None:
    """The UNet halves the grid once per level after the first: sides divisible by 2^(levels - 1)."""
    factor = 2 ** (len(settings_with_defaults(settings)["channels"]) - 1)
    if any(side % factor for side in window):
        raise ModelError("MANIFEST_INVALID", f"diffusion {what} {tuple(window)} is not divisible by {factor} "
                                             f"(the UNet's {factor}x downsampling)")


def check_sampling(run: Mapping[str, Any], settings: dict[str, Any]) -> dict[str, int]:
    """A run's ``steps`` / ``members`` / ``seed`` as integers within bounds, or SAMPLING_INVALID naming the value."""
    s = settings_with_defaults(settings)
    unknown = sorted(set(run) - {"steps", "members", "seed"})
    if unknown:
        raise UsageError("SAMPLING_INVALID", f"unknown sampling settings {unknown} (known: steps, members, seed)")
    bounds = {"steps": (1, int(s["train_steps"])), "members": (1, MAX_MEMBERS), "seed": (0, 2**63 - 1)}
    checked = {}
    for key, value in run.items():
        low, high = bounds[key]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise UsageError("SAMPLING_INVALID", f"{key} must be an integer in [{low}, {high}], got {value!r}")
        checked[key] = value
    return checked
