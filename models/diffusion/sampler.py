"""DDIM sampling with global noise: whole-volume noise per ensemble member, per-step stitched network outputs.

Peers run the whole sampler inside each window (Diff-UNet), which gives seams and uncertainty that depends on
where the windows fall. Here every ensemble member starts from one noise volume the size of the whole image; at
each reverse step the network's raw output over the whole volume is assembled by Tessera's sliding-window engine
(``output="logits"``: blended, no softmax), then one DDIM step (MONAI's ``DDIMScheduler``) moves the whole volume.
The members travel together: each window holds every member's channels, and the denoiser sees them as one batch,
so a step costs one pass over the windows whatever the ensemble size.

Masks are x0 = 2 * mask - 1, one channel per foreground class. The result per member is p = (x0 + 1) / 2 clipped
to [0, 1]; the mean over members is the probability, its per-voxel standard deviation and the binary entropy of
the mean are the uncertainty maps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from monai.networks.schedulers import DDIMScheduler

from pipelines.inference.sliding_window import mirror_combinations, sliding_window_inference

# denoiser(window batch (n, K + C, *roi), timesteps (n,)) -> (n, K, *roi): the predicted noise or mask
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class SamplerSettings:
    steps: int = 50
    members: int = 5
    eta: float = 0.0
    seed: int = 0
    prediction_type: str = "epsilon"  # or "sample" (the network predicts the mask x0)
    train_steps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02

    def __post_init__(self) -> None:
        if not 1 <= self.steps <= self.train_steps:
            raise ValueError(f"steps must be in [1, {self.train_steps}], got {self.steps}")
        if self.members < 1:
            raise ValueError(f"members must be >= 1, got {self.members}")
        if self.prediction_type not in ("epsilon", "sample"):
            raise ValueError(f"prediction_type must be 'epsilon' or 'sample', got {self.prediction_type!r}")
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {self.eta}")


@dataclass(frozen=True)
class WindowPlan:
    roi_size: tuple[int, int, int]
    overlap: float = 0.25
    mode: str = "gaussian"
    sw_batch_size: int = 2
    # test-time mirroring: member m sees the image flipped along mirror_combinations(mirror_axes)[m % combinations]
    # (the identity first), its sample is flipped back; free, as every member costs the same
    mirror_axes: tuple[int, ...] = ()


@dataclass
class SampledMasks:
    members: torch.Tensor  # (members, K, *spatial) foreground probabilities of each member, in [0, 1]
    mean: torch.Tensor  # (K, *spatial)
    std: torch.Tensor  # (K, *spatial), across members
    entropy: torch.Tensor  # (K, *spatial), binary entropy of the mean, in bits
    forwards: int  # network forwards of single windows (steps x windows x members)


def make_scheduler(settings: SamplerSettings) -> DDIMScheduler:
    """MONAI's DDIM scheduler on the training schedule (linear betas), set to ``settings.steps`` steps."""
    scheduler = DDIMScheduler(num_train_timesteps=settings.train_steps, schedule="linear_beta",
                              beta_start=settings.beta_start, beta_end=settings.beta_end, clip_sample=True,
                              prediction_type=settings.prediction_type)
    scheduler.set_timesteps(settings.steps)
    return scheduler


def sample_masks(
    denoiser: Denoiser,
    condition: torch.Tensor,
    classes: int,
    window: WindowPlan,
    settings: SamplerSettings,
    progress: Callable[[int, int], None] | None = None,
) -> SampledMasks:
    """Sample ``settings.members`` masks of ``classes`` foreground channels for ``condition`` (C, *spatial)."""
    members, channels = settings.members, condition.shape[0]
    spatial = tuple(condition.shape[1:])
    generator = torch.Generator(device=condition.device).manual_seed(settings.seed)
    x = torch.randn((members, classes, *spatial), generator=generator, device=condition.device)
    scheduler = make_scheduler(settings)
    counted = {"windows": 0}
    flips = member_flips(window.mirror_axes, members)
    seen = {dims: condition.flip(dims) if dims else condition for dims in set(flips)}  # each member's image

    def stitched_output(x_t: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        # one engine input holding every member: channels [x_1, cond_1, x_2, cond_2, ...]
        packed = torch.cat([torch.cat([x_t[m], seen[flips[m]]]) for m in range(members)])[None]

        def forward(windows: torch.Tensor) -> torch.Tensor:
            n, roi = windows.shape[0], windows.shape[2:]
            batch = windows.reshape(n * members, classes + channels, *roi)
            counted["windows"] += n * members
            out = denoiser(batch, timestep.expand(n * members))
            return out.reshape(n, members * classes, *roi)

        blended = sliding_window_inference(packed, window.roi_size, window.sw_batch_size, forward,
                                           overlap=window.overlap, mode=window.mode, output="logits")
        return blended[0].reshape(members, classes, *spatial)

    timesteps = list(scheduler.timesteps)
    for index, t in enumerate(timesteps):
        timestep = torch.as_tensor(int(t), device=condition.device).reshape(1)
        with torch.no_grad():
            model_output = stitched_output(x, timestep)
        x, _ = scheduler.step(model_output, int(t), x, eta=settings.eta, generator=generator)
        if progress is not None:
            progress(index + 1, len(timesteps))
    x = torch.stack([x[m].flip(flips[m]) if flips[m] else x[m] for m in range(members)])  # back to the image's frame
    probabilities = ((x + 1) / 2).clamp(0, 1)
    mean = probabilities.mean(0)
    return SampledMasks(members=probabilities, mean=mean, std=probabilities.std(0, unbiased=False),
                        entropy=binary_entropy(mean), forwards=counted["windows"])


def member_flips(axes: tuple[int, ...], members: int) -> list[tuple[int, ...]]:
    """Per member, the dimensions of a ``(channels, *spatial)`` tensor it is flipped along (empty: none)."""
    combos = mirror_combinations(axes)
    return [tuple(1 + a for a in combos[m % len(combos)]) for m in range(members)]


def binary_entropy(p: torch.Tensor) -> torch.Tensor:
    """-p log2 p - (1 - p) log2 (1 - p), 0 at p in {0, 1}."""
    q = p.clamp(1e-12, 1 - 1e-12)
    h = -(q * torch.log(q) + (1 - q) * torch.log(1 - q)) / math.log(2)
    return torch.where((p <= 0) | (p >= 1), torch.zeros_like(h), h)
