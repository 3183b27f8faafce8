"""The shipped demo models: verified weights, the accuracy the README states, the whole pipeline unchanged."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from models.registry import resolve_model
from pipelines.evaluation import mean_dice, score_case
from pipelines.inference import Predictor
from pipelines.ingestion.nifti import read_nifti
from pipelines.phantom_dicom import write_phantom_series
from pipelines.phantoms import make_phantom
from pipelines.segment import segment_volume
from tests.conftest import dciodvfy_errors, run_tessera

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"
MAMBA_DEMO = "mamba-clinix-phantom"


def _scores(model: str | None, image, reference):  # type: ignore[no-untyped-def]
    manifest = resolve_model(model)
    predictor = Predictor(manifest, device="cpu")
    assert predictor.weights_sha256 == manifest.weights.sha256
    labels = segment_volume(image, predictor).labels
    return score_case(labels, np.asarray(reference, dtype=np.uint8), manifest.label_names(), image.spacing)


@pytest.mark.parametrize("model", [None, MAMBA_DEMO])
def test_demo_model_segments_a_held_out_phantom(model):
    image = read_nifti(SAMPLE / "imagesTs" / "phantom_021.nii.gz")
    reference = read_nifti(SAMPLE / "labelsTs" / "phantom_021.nii.gz")
    scores = _scores(model, image, reference.array)
    assert min(s.dice for s in scores) > 0.85, scores
    assert mean_dice(scores) > 0.93


def test_mamba_demo_on_a_phantom_it_never_saw(tmp_path):
    phantom = make_phantom(4242, orientation="LAS", spacing=(1.6, 1.6, 3.0))
    nib.save(phantom.image, tmp_path / "fresh.nii.gz")
    scores = _scores(MAMBA_DEMO, read_nifti(tmp_path / "fresh.nii.gz"), np.asarray(phantom.label.dataobj))
    assert mean_dice(scores) > 0.9, scores


def test_mamba_demo_through_dicom_with_seg_stats_and_preview(tmp_path):
    """DICOM in, SEG + stats + preview out: nothing in the pipeline knows which family ran."""
    _, phantom = write_phantom_series(4343, tmp_path / "study", spacing=(2.0, 2.0, 3.0))
    run = run_tessera("segment", str(tmp_path / "study"), "-o", str(tmp_path / "out"), "--model", MAMBA_DEMO,
                      "--format", "nifti,dicom-seg,stats,preview", "--device", "cpu")
    assert run.returncode == 0, run.stderr
    (case,) = [p for p in (tmp_path / "out").iterdir() if p.is_dir()]
    assert {"mask.nii.gz", "seg.dcm", "stats.json", "preview.png"} <= {p.name for p in case.iterdir()}
    assert dciodvfy_errors(case / "seg.dcm", "Segmentation") == []
    report = json.loads((case / "report.json").read_text())
    assert report["model"]["family"] == "mamba_clinix"
    assert report["settings"]["network_runtime"]["scan_backends"]
    # the DICOM reader indexes [column, row, slice]: compare with the phantom's labels in one (canonical) layout
    mask = nib.as_closest_canonical(nib.load(case / "mask.nii.gz"))
    truth = nib.as_closest_canonical(phantom.label)
    np.testing.assert_allclose(mask.affine, truth.affine, atol=1e-3)
    manifest = resolve_model(MAMBA_DEMO)
    scores = score_case(np.asarray(mask.dataobj, dtype=np.uint8), np.asarray(truth.dataobj, dtype=np.uint8),
                        manifest.label_names(), (2.0, 2.0, 3.0))
    assert mean_dice(scores) > 0.9, scores


DIFFUSION_DEMO = "diffusion-hnc-phantom"
DIFFUSION_SHIPPED = (SAMPLE.parent / "models" / "weights" / DIFFUSION_DEMO / "manifest.json").is_file()
needs_diffusion_demo = pytest.mark.skipif(not DIFFUSION_SHIPPED, reason="diffusion-hnc-phantom is not shipped yet")


@needs_diffusion_demo
def test_diffusion_demo_on_a_pet_ct_phantom_it_never_saw_reproducibly(tmp_path):
    """A fresh PET/CT phantom through the sampler: the tumour and nodes found, and the same seed gives the same
    masks and uncertainty bit for bit."""
    from models.manifest import Channel
    from pipelines.ingestion.reading import read_case
    from pipelines.phantoms_hnc import make_hnc_phantom

    phantom = make_hnc_phantom(4242)
    folder = tmp_path
    nib.save(phantom.ct, folder / "fresh_0000.nii.gz")
    nib.save(phantom.pet, folder / "fresh_0001.nii.gz")
    manifest = resolve_model(DIFFUSION_DEMO)
    image = read_case([folder / "fresh_0000.nii.gz", folder / "fresh_0001.nii.gz"],
                      (Channel("CT", "CT"), Channel("PET", "PT")), "fresh").volume
    predictor = Predictor(manifest, device="cpu")
    assert predictor.weights_sha256 == manifest.weights.sha256
    # a fifth of the default steps, 3 of 5 members (bench/hnc_models.py measures the default): still finds both
    result = segment_volume(image, predictor.with_sampling({"steps": 10, "members": 3}))
    scores = score_case(result.labels, np.asarray(phantom.label.dataobj, np.uint8), manifest.label_names(),
                        image.spacing)
    assert mean_dice(scores) > 0.7, scores
    quick = predictor.with_sampling({"steps": 3, "members": 2, "seed": 11})
    first, second = segment_volume(image, quick), segment_volume(image, quick)
    np.testing.assert_array_equal(first.labels, second.labels)
    np.testing.assert_array_equal(first.maps["uncertainty"], second.maps["uncertainty"])
