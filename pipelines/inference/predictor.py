"""The load-once predictor: one network on one device, many cases."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from monai.data import MetaTensor

from models.families import get_family
from models.manifest import ModelManifest
from models.networks import load_network
from pipelines.errors import UsageError
from pipelines.inference.sliding_window import StitchPlan, sliding_window_inference

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


@dataclass
class Prediction:
    """What a family's prediction gives for one volume, in model space (all on the CPU).

    ``probabilities``: (K, *spatial), background first; ``maps``: extra per-voxel maps a family makes, each
    (n, *spatial), e.g. ``uncertainty``; ``details``: what the report should say of how it was made (sampler
    settings, seeds, forwards).
    """

    probabilities: torch.Tensor
    maps: dict[str, torch.Tensor] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)


WindowProgress = bool | Callable[[int, int], None]


class Predictor:
    """A network loaded once with verified weights; :meth:`probabilities` runs sliding windows."""

    def __init__(self, manifest: ModelManifest, device: str = "auto", amp: bool = False) -> None:
        self.manifest = manifest
        self.device = resolve_device(device)
        network, self.weights_sha256 = load_network(manifest)
        self.network = network.to(self.device)
        self.amp = amp and self.device.type == "cuda"
        spec = manifest.inference
        self.window = WindowSettings(spec.roi_size, spec.overlap, spec.mode, spec.sw_batch_size)
        self.last_plan: StitchPlan | None = None
        self.last_runtime: dict = {}
        self.sampling: dict[str, int] = {}  # per-run steps / members / seed for families that sample

    @classmethod
    def default_cpu(cls) -> Predictor:
        """The shipped default model on the CPU (demos and tests)."""
        from models.registry import resolve_model

        return cls(resolve_model(None), device="cpu")

    @classmethod
    def from_network(cls, manifest: ModelManifest, network: torch.nn.Module, device: str = "cpu") -> Predictor:
        """Wrap a network already in memory (training validation) without touching the weights file."""
        self = cls.__new__(cls)
        self.manifest = manifest
        self.device = resolve_device(device)
        self.network = network
        self.weights_sha256 = ""
        self.amp = False
        spec = manifest.inference
        self.window = WindowSettings(spec.roi_size, spec.overlap, spec.mode, spec.sw_batch_size)
        self.last_plan = None
        self.last_runtime = {}
        self.sampling = {}
        return self

    def predict(self, image: torch.Tensor, progress: WindowProgress = False) -> Prediction:
        """The family's prediction for a ``(C, *spatial)`` model-space input: one forward per window (the
        default), or the family's own way (a sampler over the whole volume)."""
        family = get_family(self.manifest.family)
        if family.predict is None:
            return Prediction(self.probabilities(image, progress))
        self._check_channels(image)
        was_training = self.network.training
        self.network.eval()
        try:
            prediction: Prediction = family.predict(self, image, self._progress(progress))
        finally:
            self.network.train(was_training)
        self.last_runtime = {**family.runtime_info(), **prediction.details}
        return prediction

    def _check_channels(self, image: torch.Tensor) -> None:
        expected = len(self.manifest.channels)
        if image.shape[0] != expected:
            raise UsageError(
                "CHANNEL_COUNT_MISMATCH",
                f"model '{self.manifest.name}' takes {expected} channel(s), the input has {image.shape[0]}",
            )

    def _progress(self, progress: WindowProgress) -> Callable[[int, int], None] | None:
        return progress if callable(progress) else (self._window_bar() if progress else None)

    @torch.no_grad()
    def probabilities(self, image: torch.Tensor, progress: WindowProgress = False) -> torch.Tensor:
        """Softmax class probabilities ``(K, *spatial)`` on the CPU for a ``(C, *spatial)`` input, one forward
        per window.

        ``progress``: a terminal bar over the windows, or a callback given (windows done, windows in all).
        """
        self._check_channels(image)
        was_training = self.network.training
        self.network.eval()
        family = get_family(self.manifest.family)
        family.runtime_info()  # start counting afresh for this volume
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
            progress=self._progress(progress),
        )
        self.last_plan = sliding_window_inference.last_plan  # type: ignore[attr-defined]
        self.last_runtime = family.runtime_info()  # e.g. which scan backend ran
        self.network.train(was_training)
        return probabilities[0].cpu()

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
