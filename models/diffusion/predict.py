"""How the diffusion family predicts a volume: an ensemble sampled with global noise, mean and uncertainty."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from models.diffusion.sampler import SamplerSettings, WindowPlan, sample_masks
from models.diffusion.settings import settings_with_defaults
from pipelines.inference.predictor import Prediction

log = logging.getLogger(__name__)


def sampler_settings(settings: dict[str, Any], device: torch.device,
                     run: dict[str, int] | None = None) -> tuple[SamplerSettings, list[str]]:
    """The manifest's sampler settings, or the run's steps / members / seed where given; on the CPU the
    manifest's smaller budget unless the run says otherwise, with a warning that says so."""
    s = settings_with_defaults(settings)
    run = run or {}
    warnings = []
    steps, members = int(run.get("steps", s["steps"])), int(run.get("members", s["members"]))
    if "seed" in run:
        s["seed"] = int(run["seed"])
    if device.type == "cpu" and not {"steps", "members"} & set(run):
        steps, members = min(steps, int(s["cpu_steps"])), min(members, int(s["cpu_members"]))
        if (steps, members) != (int(s["steps"]), int(s["members"])):
            warnings.append(f"DIFFUSION_CPU_BUDGET: sampling on the CPU with {steps} DDIM steps and {members} "
                            f"members instead of the model's {s['steps']} and {s['members']}; a GPU runs the full "
                            f"sampler")
    sampler = SamplerSettings(steps=steps, members=members, eta=float(s["eta"]), seed=int(s["seed"]),
                              prediction_type=str(s["prediction_type"]), train_steps=int(s["train_steps"]),
                              beta_start=float(s["beta_start"]), beta_end=float(s["beta_end"]))
    return sampler, warnings


def predict_by_sampling(predictor: Any, image: torch.Tensor,
                        progress: Callable[[int, int], None] | None) -> Prediction:
    manifest = predictor.manifest
    settings, warnings = sampler_settings(manifest.network, predictor.device, predictor.sampling)
    for warning in warnings:
        log.warning("%s", warning)
    network = predictor.network
    device = predictor.device

    def denoise(batch: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return network(batch.to(device), timesteps.to(device))

    window = predictor.window
    condition = torch.as_tensor(image, dtype=torch.float32).to(device)
    with torch.no_grad():
        result = sample_masks(denoise, condition, manifest.num_classes - 1,
                              WindowPlan(window.roi_size, window.overlap, window.mode, window.sw_batch_size,
                                         window.mirror_axes),
                              settings, progress)
    foreground = result.mean.cpu()
    background = 1 - foreground.max(0).values  # argmax picks a class exactly where its mean is over 0.5
    names = [label.name for label in sorted(manifest.labels, key=lambda lbl: lbl.value)]
    score = boundary_uncertainty(foreground >= 0.5, result.std.cpu())
    return Prediction(
        probabilities=torch.cat([background[None], foreground]),
        maps={"uncertainty": torch.cat([result.std, result.entropy]).cpu()},
        warnings=warnings,
        details={"sampler": asdict(settings), "mirror_axes": list(window.mirror_axes), "forwards": result.forwards,
                 "uncertainty_channels": [f"std_{n}" for n in names] + [f"entropy_{n}" for n in names],
                 "boundary_uncertainty": {name: value for name, value in zip(names, score, strict=True)}},
    )


def boundary_uncertainty(masks: torch.Tensor, std: torch.Tensor) -> list[float | None]:
    """Per class, the mean across-member standard deviation on the predicted boundary (the voxels within one
    voxel of the mask's surface, inside or out): a case-level score; ``None`` where nothing was predicted."""
    from scipy import ndimage

    scores: list[float | None] = []
    for mask, spread in zip(masks.numpy(), std.numpy(), strict=True):
        if not mask.any():
            scores.append(None)
            continue
        cube = np.ones((3, 3, 3), bool)
        band = ndimage.binary_dilation(mask, cube) & ~ndimage.binary_erosion(mask, cube)
        scores.append(round(float(spread[band].mean()), 6))
    return scores
