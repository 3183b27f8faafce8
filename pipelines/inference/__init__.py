"""Inference: the load-once predictor and Tessera's sliding-window engine."""

from pipelines.inference.predictor import Predictor, WindowSettings, resolve_device

__all__ = ["Predictor", "WindowSettings", "resolve_device"]
