"""The diffusion family (after Dong & Gong 2024): a 3-D DDPM whose UNet takes concat(noisy mask, image channels)
and generates the mask; an ensemble of samples gives the uncertainty. This entry imports no torch.

Network: MONAI ``DiffusionModelUNet`` (3-D, in K + C, out K, K = foreground classes). Training: 1000 DDPM steps,
linear betas, the network predicts the noise (``prediction_type: epsilon``, MSE) or the mask (``sample``: MSE plus
soft Dice and BCE on the predicted mask). Prediction: :mod:`models.diffusion.sampler` (DDIM with global noise).
"""

from __future__ import annotations

import argparse
from typing import Any

from models.diffusion.settings import DEFAULTS, check_sampling, check_window, settings_with_defaults
from models.families import Family


def _build(in_channels: int, out_channels: int, settings: dict[str, Any], roi: tuple[int, int, int]) -> Any:
    from models.diffusion.network import build_denoiser

    return build_denoiser(in_channels, out_channels, settings)


def _predict(predictor: Any, image: Any, progress: Any) -> Any:
    from models.diffusion.predict import predict_by_sampling

    return predict_by_sampling(predictor, image, progress)


def _training_loss(network: Any, image: Any, label: Any, loss_fn: Any, settings: dict[str, Any]) -> Any:
    from models.diffusion.training import diffusion_loss

    return diffusion_loss(network, image, label, settings)


def _add_train_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--unet-channels", type=lambda t: [int(p) for p in t.split(",")], default=None,
                       help="DiffusionModelUNet channels per level (default "
                            f"{','.join(map(str, DEFAULTS['channels']))})")
    group.add_argument("--prediction", choices=("epsilon", "sample"), default=None,
                       help="the network predicts the noise (MSE) or the mask (MSE + Dice + BCE); default epsilon")
    group.add_argument("--attention-levels", type=lambda t: [p.strip() in ("1", "true") for p in t.split(",")],
                       default=None, help="self-attention per level, e.g. 0,0,1 (default: the last level only; "
                                          "0,0,0 is about twice as fast on the CPU)")
    group.add_argument("--sampling-steps", type=int, default=None, help="DDIM steps at inference (GPU default 50)")
    group.add_argument("--members", type=int, default=None, help="ensemble members at inference (GPU default 5)")


def _network_from_args(args: argparse.Namespace) -> dict[str, Any]:
    chosen = {"channels": args.unet_channels, "prediction_type": args.prediction,
              "attention_levels": args.attention_levels, "steps": args.sampling_steps,
              "members": args.members}
    settings = {k: v for k, v in chosen.items() if v is not None}
    settings_with_defaults(settings)  # fail before training on a bad value
    return settings


FAMILY = Family(
    name="diffusion",
    title="Diffusion segmenter (DDPM, DDIM with global noise)",
    build=_build,
    check_window=check_window,
    add_train_arguments=_add_train_arguments,
    network_from_args=_network_from_args,
    predict=_predict,
    predicts_by_window=False,
    training_loss=_training_loss,
    takes_soft_labels=True,
    check_sampling=check_sampling,
)

__all__ = ["FAMILY"]
