"""The load-once predictor: one network on one device, many cases."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from monai.data import MetaTensor

from models.families import checked_sampling, get_family
from models.manifest import ModelManifest
from models.networks import load_network
from pipelines.errors import UsageError
from pipelines.inference.sliding_window import SlabSink, StitchPlan, last_stitch_plan, sliding_window_inference

log = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise UsageError("BAD_DEVICE", f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("CUDA_UNAVAILABLE", "--device cuda was asked for but torch sees no CUDA GPU")
    return torch.device(device)


@dataclass(frozen=True)
class WindowSettings:
    roi_size: tuple[int, int, int]
    overlap: float
    mode: str
    sw_batch_size: int
    mirror_axes: tuple[int, ...] = ()


@dataclass
class Prediction:
    """What a family's prediction gives for one volume, in model space (all on the CPU).

    ``probabilities``: (K, *spatial), background first; ``maps``: extra per-voxel maps a family makes, each
    (n, *spatial), e.g. ``uncertainty``; ``details``: what the report should say of how it was made (sampler
    settings, seeds, forwards, which kernels ran); ``plan``: the stitching plan of a window-by-window prediction;
    ``warnings``: coded warnings for the case's report.
    """

    probabilities: torch.Tensor
    maps: dict[str, torch.Tensor] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    plan: StitchPlan | None = None


WindowProgress = bool | Callable[[int, int], None]


class Predictor:
    """A network loaded once with verified weights; :meth:`predict` runs the family's prediction.

    ``sampling``: per-run steps / members / seed for families that sample (the manifest's otherwise).
    """

    def __init__(self, manifest: ModelManifest, device: str = "auto", amp: bool = False,
                 sampling: Mapping[str, int] | None = None) -> None:
        network, self.weights_sha256 = load_network(manifest)
        self._setup(manifest, network, device, amp, sampling)

    def _setup(self, manifest: ModelManifest, network: torch.nn.Module, device: str, amp: bool,
               sampling: Mapping[str, int] | None) -> None:
        self.manifest = manifest
        self.device = resolve_device(device)
        self.network = network.to(self.device)
        self.amp = amp and self.device.type == "cuda"
        spec = manifest.inference
        self.window = WindowSettings(spec.roi_size, spec.overlap, spec.mode, spec.sw_batch_size, spec.mirror_axes)
        self.sampling: dict[str, int] = checked_sampling(get_family(manifest.family), manifest.name,
                                                         manifest.network, sampling or {})

    @classmethod
    def default_cpu(cls) -> Predictor:
        """The shipped default model on the CPU (demos and tests)."""
        from models.registry import resolve_model

        return cls(resolve_model(None), device="cpu")

    @classmethod
    def from_network(cls, manifest: ModelManifest, network: torch.nn.Module, device: str = "cpu") -> Predictor:
        """Wrap a network already in memory (training validation) without touching the weights file."""
        self = cls.__new__(cls)
        self.weights_sha256 = ""
        self._setup(manifest, network, device, False, None)
        return self

    def with_sampling(self, sampling: Mapping[str, int] | None) -> Predictor:
        """This predictor (the same network in memory) with a run's own steps / members / seed."""
        other = copy.copy(self)
        other.sampling = checked_sampling(get_family(self.manifest.family), self.manifest.name,
                                          self.manifest.network, sampling or {})
        return other

    @torch.no_grad()
    def predict(self, image: torch.Tensor, progress: WindowProgress = False,
                slab_sink: SlabSink | None = None) -> Prediction:
        """The family's prediction for a ``(C, *spatial)`` model-space input: one forward per window (the
        default), or the family's own way (a sampler over the whole volume).

        ``progress``: a terminal bar over the windows, or a callback given (windows done, windows in all).
        ``slab_sink``: families that predict by window hand their probabilities to it slab by slab (the
        prediction's ``probabilities`` are then empty); the others predict whole and hand them over at once.
        """
        expected = len(self.manifest.channels)
        if image.shape[0] != expected:
            raise UsageError(
                "CHANNEL_COUNT_MISMATCH",
                f"model '{self.manifest.name}' takes {expected} channel(s), the input has {image.shape[0]}",
            )
        family = get_family(self.manifest.family)
        family.runtime_info()  # start counting afresh for this volume
        was_training = self.network.training
        self.network.eval()
        try:
            bar = progress if callable(progress) else (self._window_bar() if progress else None)
            if slab_sink is not None and family.predicts_by_window:
                prediction: Prediction = self.window_prediction(image, bar, slab_sink)
            else:
                prediction = family.predict(self, image, bar)
                if slab_sink is not None:
                    slab_sink(0, prediction.probabilities)
                    prediction.probabilities = torch.empty(0)
        finally:
            self.network.train(was_training)
        prediction.details = {**family.runtime_info(), **prediction.details}  # e.g. which scan backend ran
        return prediction

    def probabilities(self, image: torch.Tensor, progress: WindowProgress = False) -> torch.Tensor:
        """The class probabilities ``(K, *spatial)`` of :meth:`predict`."""
        return self.predict(image, progress).probabilities

    def window_prediction(self, image: torch.Tensor, progress: Callable[[int, int], None] | None,
                          slab_sink: SlabSink | None = None) -> Prediction:
        """One forward per sliding window, softmax probabilities (the discriminative families' prediction);
        handed to ``slab_sink`` slab by slab when given."""
        batch = image[None].to(self.device)
        if isinstance(batch, MetaTensor):
            batch = batch.as_tensor()
        probabilities = sliding_window_inference(
            batch,
            roi_size=self.window.roi_size,
            sw_batch_size=self.window.sw_batch_size,
            predictor=self.network,
            overlap=self.window.overlap,
            mode=self.window.mode,
            output="probabilities",
            amp=self.amp,
            mirror_axes=self.window.mirror_axes,
            progress=progress,
            slab_sink=slab_sink,
        )
        return Prediction(probabilities[0].cpu() if slab_sink is None else probabilities, plan=last_stitch_plan())

    @staticmethod
    def _window_bar():  # type: ignore[no-untyped-def]
        from tqdm import tqdm

        bar: dict[str, tqdm] = {}

        def update(done: int, total: int) -> None:
            if "bar" not in bar:
                bar["bar"] = tqdm(total=total, desc="windows", unit="win", leave=False)
            bar["bar"].update(done - bar["bar"].n)
            if done >= total:
                bar["bar"].close()

        return update
