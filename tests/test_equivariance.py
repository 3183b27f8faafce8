"""A re-oriented input gives the identically re-oriented mask, on the input's own grid."""

import nibabel as nib
import numpy as np
import pytest
from nibabel import orientations

from pipelines.inference import Predictor
from pipelines.ingestion.nifti import read_nifti
from pipelines.phantoms import make_phantom
from pipelines.segment import segment_volume


def _reorient(image: nib.Nifti1Image, axcodes: str) -> nib.Nifti1Image:
    transform = orientations.ornt_transform(orientations.io_orientation(image.affine),
                                            orientations.axcodes2ornt(tuple(axcodes)))
    return image.as_reoriented(transform)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    fg_a, fg_b = a > 0, b > 0
    return 2 * float((fg_a & fg_b & (a == b)).sum()) / max(float(fg_a.sum() + fg_b.sum()), 1.0)


@pytest.mark.parametrize("fixture", ["tiny_model_native", "tiny_model", "tiny_mamba_native", "tiny_mamba"])
@pytest.mark.parametrize("target", ["PIR", "LAI", "SRP"])
def test_reoriented_input_gives_reoriented_mask(request, tmp_path, fixture, target):
    predictor = Predictor(request.getfixturevalue(fixture), device="cpu")
    phantom = make_phantom(11, orientation="LPS", spacing=(4.0, 4.0, 5.0))
    nib.save(phantom.image, tmp_path / "a.nii.gz")
    moved = _reorient(phantom.image, target)
    nib.save(moved, tmp_path / "b.nii.gz")
    original, permuted = read_nifti(tmp_path / "a.nii.gz"), read_nifti(tmp_path / "b.nii.gz")
    assert not np.allclose(permuted.affine, original.affine)  # a different grid, the same physical image

    mask_a = segment_volume(original, predictor).labels
    mask_b = segment_volume(permuted, predictor).labels
    assert mask_b.shape == permuted.spatial_shape
    expected = np.asarray(_reorient(nib.Nifti1Image(mask_a, original.affine), target).dataobj)
    assert np.any(mask_a > 0), "the model predicted nothing: the test would prove nothing"
    if fixture.endswith("_native"):
        np.testing.assert_array_equal(mask_b, expected)  # no resampling: exactly equal
    else:
        assert _dice(mask_b, expected) >= 0.99


def test_written_mask_affine_equals_input_affine(tmp_path, tiny_model):
    from pipelines.cases import CaseInput
    from pipelines.segment import segment_case

    predictor = Predictor(tiny_model, device="cpu")
    phantom = make_phantom(12, orientation="ASL", spacing=(4.0, 4.0, 5.0))
    nib.save(phantom.image, tmp_path / "case.nii.gz")
    result = segment_case(CaseInput("case", (tmp_path / "case.nii.gz",)), tmp_path / "out", predictor)
    assert result.status == "succeeded", result.error_message
    mask = nib.load(tmp_path / "out" / "case" / "mask.nii.gz")
    assert mask.shape == phantom.image.shape
    np.testing.assert_array_equal(mask.affine, nib.load(tmp_path / "case.nii.gz").affine)
    assert nib.aff2axcodes(mask.affine) == ("A", "S", "L")
