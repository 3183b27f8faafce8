"""Segmenter families as plug-ins: one folder under ``models/`` each, found here by name.

A family's package exposes ``FAMILY``, a :class:`Family` saying how to build its network from a manifest,
which window sizes it can take, how it trains by default and which training options it adds to the CLI.
The factory, the trainer, the predictor and the CLI look families up here; none of them branches on a
family's name. The names are known without importing torch (the registry and the service list models
torch-free); a family's own code is imported only when it is used.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipelines.errors import ModelError, UsageError

if TYPE_CHECKING:
    from torch import nn

# family name -> the package that defines its FAMILY entry
FAMILY_PACKAGES: dict[str, str] = {
    "swin_unetr": "models.swin_unetr",
    "mamba_clinix": "models.mamba_clinix",
    "diffusion": "models.diffusion",
}
FAMILIES = tuple(FAMILY_PACKAGES)
LOSSES = ("dicece", "compound")  # models.losses builds them

Triple = tuple[int, int, int]


@dataclass(frozen=True)
class TrainingRecipe:
    """Optimiser and schedule: ``adamw`` or ``adam``; ``onecycle`` (cosine, 5% warm-up) or ``poly``."""

    optimizer: str = "adamw"
    learning_rate: float = 1e-3
    weight_decay: float = 1e-5
    schedule: str = "onecycle"
    poly_exponent: float = 0.9


@dataclass(frozen=True)
class Family:
    name: str
    title: str
    # (in_channels, out_channels, network settings, inference roi) -> an untrained network; MANIFEST_INVALID
    # (naming the value) for settings it cannot build
    build: Callable[[int, int, dict[str, Any], Triple], nn.Module]
    # (window or crop size, network settings, what it is) -> None, or MANIFEST_INVALID
    check_window: Callable[[Triple, dict[str, Any], str], None]
    # training options of this family for ``tessera train`` (one argument group) and the settings they give
    add_train_arguments: Callable[[argparse._ArgumentGroup], None]
    network_from_args: Callable[[argparse.Namespace], dict[str, Any]]
    # fill in what the window decides (e.g. a stage count) so that a trained manifest states its network exactly
    resolve_settings: Callable[[dict[str, Any], Triple], dict[str, Any]] = field(default=lambda s, roi: dict(s))
    default_loss: str = "dicece"
    reference_recipe: TrainingRecipe | None = None
    # what ran inside the network, for the run report (e.g. which scan backend)
    runtime_info: Callable[[], dict[str, Any]] = field(default=lambda: {})
    # how it predicts a volume: (predictor, model-space input (C, *spatial), window progress) -> Prediction;
    # one forward per sliding window unless the family has its own way (a sampler over the whole volume)
    predict: Callable[[Any, Any, Any], Any] = field(default=lambda predictor, image, progress:
                                                    predictor.window_prediction(image, progress))
    # whether ``predict`` is the sliding window's (so its probabilities can be streamed slab by slab)
    predicts_by_window: bool = True
    # (network, image batch, label batch, the named loss, network settings) -> the training loss of one batch
    training_loss: Callable[[Any, Any, Any, Any, dict[str, Any]], Any] = field(
        default=lambda network, image, label, loss, settings: loss(network(image), label))
    # whether ``training_loss`` takes soft labels: (B, classes incl. background, *crop) fractions that sum to 1
    takes_soft_labels: bool = False
    # families that sample: (per-run steps / members / seed, network settings) -> the checked run settings,
    # or SAMPLING_INVALID; None for a family that does not sample (SAMPLING_NOT_SUPPORTED)
    check_sampling: Callable[[Mapping[str, Any], dict[str, Any]], dict[str, int]] | None = None


def checked_sampling(family: Family, model: str, settings: dict[str, Any], run: Mapping[str, Any]) -> dict[str, int]:
    """A run's sampling settings for ``model`` (of ``family``, network ``settings``), checked; empty: the model's."""
    if not run:
        return {}
    if family.check_sampling is None:
        raise UsageError("SAMPLING_NOT_SUPPORTED", f"model '{model}' ({family.name}) does not sample: steps, "
                                                   f"members and seed apply to sampling families (diffusion)")
    return family.check_sampling(run, settings)


def get_family(name: str) -> Family:
    """The family entry of ``name`` (imports the family's package)."""
    if name not in FAMILY_PACKAGES:
        raise ModelError("MANIFEST_INVALID", f"family must be one of {FAMILIES}, got {name!r}")
    family: Family = importlib.import_module(FAMILY_PACKAGES[name]).FAMILY
    return family


def all_families() -> list[Family]:
    return [get_family(name) for name in FAMILIES]
