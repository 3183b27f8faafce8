"""The shipped demo model: verified weights, and the accuracy the README states on held-out phantoms."""

from pathlib import Path

import numpy as np

from models.registry import resolve_model
from pipelines.evaluation import mean_dice, score_case
from pipelines.inference import Predictor
from pipelines.ingestion.nifti import read_nifti
from pipelines.segment import segment_volume

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"


def test_demo_model_segments_a_held_out_phantom():
    manifest = resolve_model(None)
    predictor = Predictor(manifest, device="cpu")
    assert predictor.weights_sha256 == manifest.weights.sha256
    image = read_nifti(SAMPLE / "imagesTs" / "phantom_021.nii.gz")
    reference = read_nifti(SAMPLE / "labelsTs" / "phantom_021.nii.gz")
    labels = segment_volume(image, predictor).labels
    scores = score_case(labels, reference.array.astype(np.uint8), manifest.label_names(), image.spacing)
    assert min(s.dice for s in scores) > 0.9, scores
    assert mean_dice(scores) > 0.95
