"""Real public NIfTI data from ../shared/data: masks land on the source grid, header codes survive."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel import orientations

from pipelines.cases import CaseInput
from pipelines.inference import Predictor
from pipelines.ingestion.nifti import read_nifti
from pipelines.segment import segment_case, segment_volume

pytestmark = pytest.mark.shared_data

TOTALSEG = Path("totalsegmentator/tests/reference_files")
OBLIQUE_MR = Path("ivadomed_data_testing/sub-unf01/anat/sub-unf01_T2w.nii.gz")
SPLEEN_CT = Path("ivadomed_data_testing/ct_scan/sub-spleen2/ct/sub-spleen2_ct.nii.gz")


def _segment_to(tmp_path: Path, source: Path, predictor: Predictor) -> nib.Nifti1Image:
    result = segment_case(CaseInput("case", (source,)), tmp_path, predictor)
    assert result.status == "succeeded", result.error_message
    return nib.load(tmp_path / "case" / "mask.nii.gz")


def test_real_ct_mask_has_the_grid_of_totalsegmentators_output(tmp_path, shared_data):
    """The default model on TotalSegmentator's example CT: same grid as TotalSegmentator's own mask."""
    predictor = Predictor.default_cpu()
    mask = _segment_to(tmp_path, shared_data / TOTALSEG / "example_ct_sm.nii.gz", predictor)
    reference = nib.load(shared_data / TOTALSEG / "example_seg.nii.gz")
    assert mask.shape == reference.shape
    np.testing.assert_array_equal(mask.affine, reference.affine)
    assert int(mask.header["sform_code"]) == int(reference.header["sform_code"]) == 2
    assert int(mask.header["qform_code"]) == int(reference.header["qform_code"]) == 0


@pytest.mark.parametrize("relative", [OBLIQUE_MR, SPLEEN_CT, TOTALSEG / "example_mr_sm.nii.gz"])
def test_real_volumes_keep_their_grid(tmp_path, shared_data, tiny_model, relative):
    source = nib.load(shared_data / relative)
    mask = _segment_to(tmp_path, shared_data / relative, Predictor(tiny_model, device="cpu"))
    assert mask.shape == source.shape[:3]
    np.testing.assert_array_equal(mask.affine, source.affine)


def test_oblique_real_volume_is_orientation_equivariant(tmp_path, shared_data, tiny_model_native):
    """An oblique MR stored with its axes permuted and flipped gives the permuted, flipped mask."""
    image = nib.load(shared_data / OBLIQUE_MR)
    transform = orientations.ornt_transform(orientations.io_orientation(image.affine),
                                            orientations.axcodes2ornt(("S", "L", "P")))
    moved = image.as_reoriented(transform)
    nib.save(moved, tmp_path / "moved.nii.gz")
    predictor = Predictor(tiny_model_native, device="cpu")
    mask = segment_volume(read_nifti(shared_data / OBLIQUE_MR), predictor).labels
    mask_moved = segment_volume(read_nifti(tmp_path / "moved.nii.gz"), predictor).labels
    expected = np.asarray(nib.Nifti1Image(mask, image.affine).as_reoriented(transform).dataobj)
    assert mask.any()
    np.testing.assert_array_equal(mask_moved, expected)
