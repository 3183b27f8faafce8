"""One DDPM training loss for the diffusion family: noise a mask at a random step, predict noise or mask."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.schedulers import DDPMScheduler

from models.diffusion.settings import settings_with_defaults
from models.losses import soft_dice_score


def diffusion_loss(network: torch.nn.Module, image: torch.Tensor, label: torch.Tensor,
                   settings: dict[str, Any]) -> torch.Tensor:
    """``image`` (B, C, *crop), ``label`` (B, 1, *crop) integers or (B, classes, *crop) per-class fractions (soft
    labels, background first) -> the training loss of one batch."""
    s = settings_with_defaults(settings)
    classes = int(network.out_channels) + 1  # type: ignore[arg-type]
    if label.shape[1] == classes:
        onehot = label.float()
    else:
        onehot = F.one_hot(label[:, 0].long(), classes).permute(0, 4, 1, 2, 3).float()
    x0 = 2 * onehot[:, 1:] - 1
    scheduler = DDPMScheduler(num_train_timesteps=int(s["train_steps"]), schedule="linear_beta",
                              beta_start=float(s["beta_start"]), beta_end=float(s["beta_end"]))
    timesteps = torch.randint(0, int(s["train_steps"]), (x0.shape[0],), device=x0.device)
    noise = torch.randn_like(x0)
    noisy = scheduler.add_noise(x0, noise, timesteps)
    output = network(torch.cat([noisy, image.float()], dim=1), timesteps)
    if s["prediction_type"] == "epsilon":
        return F.mse_loss(output, noise)
    mask = ((output.clamp(-1, 1) + 1) / 2).clamp(1e-6, 1 - 1e-6)
    with_background = torch.cat([1 - mask.max(1, keepdim=True).values, mask], dim=1)
    mask_loss = (1 - soft_dice_score(with_background, onehot)) + F.binary_cross_entropy(mask, onehot[:, 1:])
    return F.mse_loss(output, x0) + float(s["mask_loss_weight"]) * mask_loss
