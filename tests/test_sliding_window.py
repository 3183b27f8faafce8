"""Tessera's sliding-window engine against MONAI's: same grid, same numbers, less memory."""

import pytest
import torch
from monai.inferers import sliding_window_inference as monai_sliding_window

from pipelines.inference.sliding_window import (
    argmax_classes,
    plan_stitching,
    sliding_window_inference,
    softmax_classes,
)


@pytest.fixture(scope="module")
def network() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Conv3d(1, 5, 3, padding=1).eval()


CASES = [
    ((40, 37, 29), (16, 16, 16), 0.25, 3),  # sizes not divisible by the step
    ((12, 50, 20), (16, 24, 8), 0.5, 1),  # anisotropic roi, volume smaller than roi on one axis
    ((10, 10, 10), (16, 16, 16), 0.25, 2),  # volume smaller than the roi everywhere
    ((64, 33, 47), (32, 16, 16), 0.6, 4),  # several rows of windows along the first axis
]


@pytest.mark.parametrize(("shape", "roi", "overlap", "batch"), CASES)
@pytest.mark.parametrize("mode", ["gaussian", "constant"])
def test_parity_with_monai(network, shape, roi, overlap, batch, mode):
    torch.manual_seed(1)
    image = torch.randn(1, 1, *shape)
    with torch.no_grad():
        reference = monai_sliding_window(image, roi, batch, network, overlap=overlap, mode=mode)
        logits = sliding_window_inference(image, roi, batch, network, overlap=overlap, mode=mode, output="logits")
        probabilities = sliding_window_inference(image, roi, batch, network, overlap=overlap, mode=mode)
        labels = sliding_window_inference(image, roi, batch, network, overlap=overlap, mode=mode, output="labels")
    assert logits.shape == reference.shape and labels.shape == (1, *shape) and labels.dtype == torch.uint8
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(probabilities, torch.softmax(reference, dim=1), atol=1e-5, rtol=0)
    assert torch.equal(labels.long(), reference.argmax(dim=1))


def test_batch_of_images(network):
    image = torch.randn(2, 1, 20, 18, 17)
    with torch.no_grad():
        reference = monai_sliding_window(image, (16, 16, 16), 2, network, overlap=0.25, mode="gaussian")
        ours = sliding_window_inference(image, (16, 16, 16), 2, network, overlap=0.25, output="logits")
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)


def test_tiny_budget_forces_slab_streaming_with_identical_labels(network):
    image = torch.randn(1, 1, 80, 30, 30)
    with torch.no_grad():
        reference = monai_sliding_window(image, (16, 16, 16), 3, network, overlap=0.5, mode="gaussian")
        labels = sliding_window_inference(image, (16, 16, 16), 3, network, overlap=0.5, output="labels",
                                          memory_budget_bytes=10_000)
    plan = sliding_window_inference.last_plan
    assert plan.slab_streaming and plan.accumulator_shape[1] == 16  # one roi-thick slab, not 80 slices
    assert plan.accumulate_dtype == "float16"  # float32 did not fit the budget
    assert (labels.long() == reference.argmax(dim=1)).float().mean() >= 0.9999


@pytest.mark.parametrize("batch", [1, 2, 4, 5])
def test_streaming_with_batches_that_span_rows(network, batch):
    """9 windows a row: batches of 2, 4 and 5 mix two rows of windows; the slab must follow."""
    image = torch.randn(1, 1, 80, 30, 30)
    with torch.no_grad():
        reference = monai_sliding_window(image, (16, 16, 16), batch, network, overlap=0.5, mode="gaussian")
        labels = sliding_window_inference(image, (16, 16, 16), batch, network, overlap=0.5, output="labels",
                                          memory_budget_bytes=10_000, accumulate_dtype=torch.float32)
    assert sliding_window_inference.last_plan.slab_streaming
    assert torch.equal(labels.long(), reference.argmax(dim=1))


def test_predictor_output_is_not_modified(network):
    kept = []

    def predictor(batch: torch.Tensor) -> torch.Tensor:
        out = network(batch)
        kept.append((out, out.clone()))
        return out

    with torch.no_grad():
        sliding_window_inference(torch.randn(1, 1, 40, 20, 20), (16, 16, 16), 2, predictor, output="labels",
                                 accumulate_dtype=torch.float16)
    assert all(torch.equal(out, copy) for out, copy in kept)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_float16_accumulation_keeps_labels_many_seeds(seed):
    torch.manual_seed(seed)
    network = torch.nn.Conv3d(1, 5, 3, padding=1).eval()
    image = torch.randn(1, 1, 48, 40, 36)
    with torch.no_grad():
        reference = monai_sliding_window(image, (16, 16, 16), 2, network, overlap=0.5, mode="gaussian")
        labels = sliding_window_inference(image, (16, 16, 16), 2, network, overlap=0.5, output="labels",
                                          accumulate_dtype=torch.float16)
    assert sliding_window_inference.last_plan.accumulate_dtype == "float16"
    assert (labels.long() == reference.argmax(dim=1)).float().mean() >= 0.9999


def test_planner_decisions():
    cpu = torch.device("cpu")
    big = plan_stitching((256, 256, 256), (96, 96, 96), 105, 125, 2, "labels", cpu, memory_budget_bytes=64 * 2**30)
    assert big.slab_streaming and big.accumulate_dtype == "float16" and big.accumulator_shape == (105, 96, 256, 256)
    small = plan_stitching((192, 192, 128), (96, 96, 96), 14, 18, 2, "labels", cpu, memory_budget_bytes=64 * 2**30)
    assert not small.slab_streaming and small.accumulate_dtype == "float32"
    probabilities = plan_stitching((256, 256, 256), (96, 96, 96), 105, 125, 2, "probabilities", cpu,
                                   memory_budget_bytes=64 * 2**30)
    assert not probabilities.slab_streaming and probabilities.accumulate_dtype == "float32"
    assert "fits" in probabilities.reason


def test_more_than_256_classes_use_16_bit_labels():
    network = torch.nn.Conv3d(1, 300, 1).eval()
    with torch.no_grad():
        labels = sliding_window_inference(torch.randn(1, 1, 8, 8, 8), (8, 8, 8), 1, network, output="labels")
    assert labels.dtype == torch.int16 and int(labels.max()) < 300


def test_class_axis_helpers_match_torch():
    scores = torch.randn(7, 5, 6, 4)
    scores[3, 0, 0, 0] = scores[1, 0, 0, 0]  # a tie goes to the lower class, as argmax does
    assert torch.equal(argmax_classes(scores).long(), torch.argmax(scores, dim=0))
    torch.testing.assert_close(softmax_classes(scores), torch.softmax(scores, dim=0))


def test_mirroring_averages_flipped_predictions(network):
    image = torch.randn(1, 1, 20, 20, 20)
    with torch.no_grad():
        plain = sliding_window_inference(image, (16, 16, 16), 2, network, output="logits")
        flipped = torch.flip(sliding_window_inference(torch.flip(image, [2]), (16, 16, 16), 2, network,
                                                      output="logits"), [2])
        mirrored = sliding_window_inference(image, (16, 16, 16), 2, network, output="logits", mirror_axes=(0,))
    torch.testing.assert_close(mirrored, (plain + flipped) / 2, atol=1e-5, rtol=0)


def test_a_manifests_mirror_axes_reach_the_engine(tiny_model):
    """inference.mirror_axes in a window family's manifest: the predictor's probabilities are the engine's mirrored
    ones (the mean over the flips), not the plain ones."""
    from dataclasses import replace

    from pipelines.inference import Predictor

    mirrored_manifest = replace(tiny_model, inference=replace(tiny_model.inference, mirror_axes=(0,)))
    plain, mirrored = Predictor(tiny_model, device="cpu"), Predictor(mirrored_manifest, device="cpu")
    assert mirrored.window.mirror_axes == (0,)
    torch.manual_seed(1)
    image = torch.randn(1, 40, 36, 30)
    with torch.no_grad():
        expected = sliding_window_inference(image[None], mirrored.window.roi_size, 2, mirrored.network,
                                            output="probabilities", mirror_axes=(0,))[0]
        got = mirrored.window_prediction(image, None).probabilities
        unmirrored = plain.window_prediction(image, None).probabilities
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert not torch.allclose(got, unmirrored, atol=1e-4)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"overlap": 1.0}, "overlap must be in [0, 1), got 1.0"),
    ({"mode": "cubic"}, "mode must be one of"),
    ({"output": "masks"}, "output must be one of"),
    ({"sw_batch_size": 0}, "sw_batch_size must be >= 1, got 0"),
])
def test_invalid_arguments_are_named(network, kwargs, message):
    arguments = {"roi_size": (8, 8, 8), "sw_batch_size": 1, "predictor": network, **kwargs}
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        sliding_window_inference(torch.randn(1, 1, 8, 8, 8), **arguments)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu(network):
    image = torch.randn(1, 1, 40, 37, 29)
    with torch.no_grad():
        cpu = sliding_window_inference(image, (16, 16, 16), 2, network, output="probabilities")
        gpu = sliding_window_inference(image.cuda(), (16, 16, 16), 2, network.cuda(), output="probabilities")
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("shape", "roi", "overlap", "batch"), CASES)
@pytest.mark.parametrize("output", ["probabilities", "logits"])
def test_slab_sink_hands_over_the_whole_result_in_order(network, shape, roi, overlap, batch, output):
    """Probabilities streamed slab by slab are the whole result, bit for bit, in consecutive slabs (padded volumes
    cropped), and the engine holds a roi-thick slab, not the volume."""
    torch.manual_seed(2)
    image = torch.randn(1, 1, *shape)
    slabs: list[tuple[int, torch.Tensor]] = []
    with torch.no_grad():
        whole = sliding_window_inference(image, roi, batch, network, overlap=overlap, output=output)
        returned = sliding_window_inference(image, roi, batch, network, overlap=overlap, output=output,
                                            slab_sink=lambda start, values: slabs.append((start, values.clone())))
    assert returned.numel() == 0
    starts = [start for start, _ in slabs]
    assert starts[0] == 0 and all(b == a + s.shape[1] for (a, s), b in zip(slabs, starts[1:], strict=False))
    streamed = torch.cat([values for _, values in slabs], dim=1)
    assert torch.equal(streamed, whole[0])
    plan = sliding_window_inference.last_plan
    assert plan.slab_streaming == (shape[0] > roi[0])
    if plan.slab_streaming:
        assert len(slabs) > 1 and plan.accumulator_shape[1] == roi[0]
