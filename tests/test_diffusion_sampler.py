"""Global-noise DDIM sampling: oracles on constructed denoisers (exact answers, no seams, MONAI parity)."""

from __future__ import annotations

import pytest
import torch
from monai.inferers import DiffusionInferer

from models.diffusion.sampler import SamplerSettings, WindowPlan, binary_entropy, make_scheduler, sample_masks

SHAPE = (40, 36, 28)


def _known_mask() -> torch.Tensor:
    mask = torch.zeros(2, *SHAPE)
    mask[0, 5:30, 8:20, 3:25] = 1
    mask[1, 28:38, 22:34, 10:20] = 1
    return mask


def _exact_denoiser(settings: SamplerSettings, classes: int = 2):
    """Knows the answer: the mask rides in the condition channels; returns x0 or the exact noise."""
    alphas = make_scheduler(settings).alphas_cumprod

    def denoise(batch: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        x_t, x0 = batch[:, :classes], 2 * batch[:, classes:] - 1
        if settings.prediction_type == "sample":
            return x0
        a = alphas[timesteps].view(-1, 1, 1, 1, 1).to(batch.dtype)
        return (x_t - a.sqrt() * x0) / (1 - a).sqrt()

    return denoise


@pytest.mark.parametrize("prediction", ["sample", "epsilon"])
def test_exact_denoiser_recovers_the_mask_through_small_windows(prediction):
    settings = SamplerSettings(steps=10, members=2, prediction_type=prediction, seed=3)
    mask = _known_mask()
    result = sample_masks(_exact_denoiser(settings), mask, 2, WindowPlan((16, 16, 16), overlap=0.25), settings)
    assert torch.equal(result.mean >= 0.5, mask.bool())
    torch.testing.assert_close(result.mean, mask, atol=1e-4, rtol=0)
    assert float(result.std.max()) < 1e-4  # every member found the same answer
    windows = 3 * 3 * 2  # the engine's grid for 40x36x28 with roi 16, overlap 0.25
    assert result.forwards == settings.steps * windows * settings.members


def test_voxelwise_denoiser_has_no_seams_whatever_the_windows():
    """A denoiser acting voxel by voxel: the stitched output is the same for every roi and overlap."""
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(3, 2, 1)
    settings = SamplerSettings(steps=6, members=3, seed=7)

    def denoise(batch: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return torch.tanh(conv(batch)) * (1 + timesteps.view(-1, 1, 1, 1, 1) / 1000)

    condition = torch.rand(1, *SHAPE)
    reference = sample_masks(denoise, condition, 2, WindowPlan(SHAPE, overlap=0.0), settings)
    for roi, overlap in (((16, 16, 16), 0.25), ((12, 20, 8), 0.5), ((32, 32, 32), 0.75)):
        other = sample_masks(denoise, condition, 2, WindowPlan(roi, overlap=overlap), settings)
        torch.testing.assert_close(other.members, reference.members, atol=2e-5, rtol=0)
        torch.testing.assert_close(other.std, reference.std, atol=2e-5, rtol=0)


def test_identical_members_give_zero_uncertainty_and_the_seed_reproduces_bit_for_bit():
    settings = SamplerSettings(steps=5, members=4, prediction_type="sample", seed=11)
    mask = _known_mask()

    def ignore_noise(batch: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return 2 * batch[:, 2:] - 1  # the answer does not depend on the member's noise
    result = sample_masks(ignore_noise, mask, 2, WindowPlan((16, 16, 16)), settings)
    assert float(result.std.abs().max()) == 0.0
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(4, 2, 3, padding=1)
    noisy = SamplerSettings(steps=4, members=3, eta=0.5, seed=5)

    def learned(batch: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return conv(batch)

    with torch.no_grad():
        first = sample_masks(learned, mask, 2, WindowPlan((16, 16, 16)), noisy)
        second = sample_masks(learned, mask, 2, WindowPlan((16, 16, 16)), noisy)
        other_seed = sample_masks(learned, mask, 2, WindowPlan((16, 16, 16)), SamplerSettings(
            steps=4, members=3, eta=0.5, seed=6))
    assert torch.equal(first.members, second.members) and torch.equal(first.entropy, second.entropy)
    assert not torch.equal(first.members, other_seed.members)
    assert float(first.std.max()) > 0  # different noise per member: a spread


def test_mirrored_members_see_the_flipped_image_and_come_back_unflipped():
    """Test-time mirroring inside the ensemble: an exact denoiser that reads the answer from the image (so it follows
    any flip) still recovers the mask exactly; one that ignores the image and always answers the same mask shows that
    every second member worked in the mirrored frame: its sample comes back as the mirror image of that mask."""
    mask = _known_mask()
    settings = SamplerSettings(steps=6, members=4, prediction_type="sample", seed=2)
    plan = WindowPlan((16, 16, 16), overlap=0.25, mirror_axes=(0,))
    result = sample_masks(_exact_denoiser(settings), mask, 2, plan, settings)
    torch.testing.assert_close(result.mean, mask, atol=1e-4, rtol=0)
    assert float(result.std.max()) < 1e-4

    fixed = 2 * mask - 1

    def answers_the_same_mask(batch: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return fixed[None].expand(batch.shape[0], -1, -1, -1, -1)  # whole-volume window: exact, seen in its frame

    whole = WindowPlan(SHAPE, overlap=0.0, mirror_axes=(0,))
    fixed_result = sample_masks(answers_the_same_mask, mask, 2, whole, settings)
    mirrored = mask.flip(1)
    for m in range(4):
        torch.testing.assert_close(fixed_result.members[m], mask if m % 2 == 0 else mirrored, atol=1e-4, rtol=0)
    torch.testing.assert_close(fixed_result.mean, (mask + mirrored) / 2, atol=1e-4, rtol=0)
    torch.testing.assert_close(fixed_result.std, (mask - mirrored).abs() / 2, atol=1e-4, rtol=0)
    # two axes: the identity, each axis alone and both, member by member
    both = sample_masks(answers_the_same_mask, mask, 2, WindowPlan(SHAPE, overlap=0.0, mirror_axes=(2, 0)),
                        SamplerSettings(steps=2, members=4, prediction_type="sample"))
    for m, dims in enumerate([(), (1,), (3,), (1, 3)]):
        torch.testing.assert_close(both.members[m], mask.flip(dims) if dims else mask, atol=1e-4, rtol=0)


def test_mirroring_off_leaves_the_samples_unchanged():
    """Mirroring is opt-in: without mirror_axes a sampled result is what it was before (bit for bit)."""
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(4, 2, 3, padding=1)
    settings = SamplerSettings(steps=3, members=2, seed=4)
    mask = _known_mask()
    with torch.no_grad():
        plain = sample_masks(lambda b, t: conv(b), mask, 2, WindowPlan((16, 16, 16)), settings)
        mirrored = sample_masks(lambda b, t: conv(b), mask, 2, WindowPlan((16, 16, 16), mirror_axes=(0,)), settings)
    assert torch.equal(plain.members[0], mirrored.members[0])  # member 0 is never mirrored
    assert not torch.equal(plain.members[1], mirrored.members[1])


def test_one_window_equals_monai_diffusion_inferer():
    """With the whole volume in one window our loop is MONAI's DDIM sampler (DiffusionInferer, mode concat)."""
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(3, 2, 3, padding=1)
    settings = SamplerSettings(steps=8, members=1, seed=2)
    shape = (16, 16, 12)
    condition = torch.rand(1, *shape)

    def denoise(batch: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return conv(batch) * (timesteps.view(-1, 1, 1, 1, 1).float() / 1000)

    with torch.no_grad():
        ours = sample_masks(denoise, condition, 2, WindowPlan(shape, overlap=0.0, mode="constant"), settings)
        noise = torch.randn((1, 2, *shape), generator=torch.Generator().manual_seed(settings.seed))

        class Network(torch.nn.Module):
            def forward(self, x, timesteps, context=None):  # type: ignore[no-untyped-def]
                return denoise(x, timesteps)

        monai = DiffusionInferer(make_scheduler(settings)).sample(noise, Network(), make_scheduler(settings),
                                                                  conditioning=condition[None], mode="concat",
                                                                  verbose=False)
    torch.testing.assert_close(ours.members, ((monai + 1) / 2).clamp(0, 1), atol=1e-6, rtol=0)


def test_entropy_and_settings_checks():
    assert binary_entropy(torch.tensor([0.0, 0.5, 1.0])).tolist() == [0.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="steps"):
        SamplerSettings(steps=0)
    with pytest.raises(ValueError, match="prediction_type"):
        SamplerSettings(prediction_type="v")


def test_diffusion_manifest_settings_are_checked_up_front():
    from models.diffusion.predict import sampler_settings
    from models.diffusion.settings import check_window, settings_with_defaults
    from pipelines.errors import ModelError

    for bad, words in (({"channels": [12, 16]}, "multiple of norm_num_groups"), ({"steps": 0}, "steps"),
                       ({"prediction_type": "v"}, "prediction_type"), ({"depth": 2}, "depth")):
        with pytest.raises(ModelError, match=words):
            settings_with_defaults(bad)
    with pytest.raises(ModelError, match=r"\(32, 32, 30\)"):
        check_window((32, 32, 30), {"channels": [8, 16, 32]}, "roi_size")
    settings, warnings = sampler_settings({}, torch.device("cpu"))
    assert (settings.steps, settings.members) == (10, 3) and warnings[0].startswith("DIFFUSION_CPU_BUDGET")
    settings, warnings = sampler_settings({}, torch.device("cuda"))
    assert (settings.steps, settings.members) == (50, 5) and warnings == []
    settings, warnings = sampler_settings({}, torch.device("cpu"), {"steps": 4, "seed": 9})
    assert (settings.steps, settings.members, settings.seed) == (4, 5, 9) and warnings == []


def test_boundary_uncertainty_reads_the_spread_on_the_predicted_surface():
    from models.diffusion.predict import boundary_uncertainty

    masks = torch.zeros(2, 10, 10, 10, dtype=torch.bool)
    masks[0, 3:7, 3:7, 3:7] = True
    std = torch.zeros(2, 10, 10, 10)
    std[0, 3:7, 3:7, 3:7] = 0.2
    std[0, 4:6, 4:6, 4:6] = 0.0  # the core is certain, the surface is not
    score = boundary_uncertainty(masks, std)
    band = 6**3 - 2**3  # voxels within one voxel of the surface: dilated cube minus eroded cube
    assert score[0] == pytest.approx(0.2 * (4**3 - 2**3) / band, abs=1e-6) and score[1] is None
