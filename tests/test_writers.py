import nibabel as nib
import numpy as np

from pipelines.ingestion.nifti import read_nifti
from pipelines.writers.nifti import write_mask


def test_mask_keeps_qform_sform_and_codes(tmp_path):
    sform = np.array([[-2.0, 0, 0, 90], [0, -2.0, 0, 120], [0, 0, 3.0, -60], [0, 0, 0, 1]])
    qform = sform.copy()
    qform[:3, 3] += 0.5  # qform and sform may legitimately differ: both must survive
    image = nib.Nifti1Image(np.zeros((6, 7, 8), np.int16), sform)
    image.set_sform(sform, code=2)
    image.set_qform(qform, code=1)
    nib.save(image, tmp_path / "src.nii.gz")
    volume = read_nifti(tmp_path / "src.nii.gz")
    labels = np.zeros((6, 7, 8), np.uint8)
    labels[1:3, 2:4, 3:5] = 4
    written = nib.load(write_mask(labels, volume, tmp_path / "mask.nii.gz"))
    assert written.get_data_dtype() == np.uint8
    assert int(written.header["sform_code"]) == 2 and int(written.header["qform_code"]) == 1
    np.testing.assert_allclose(written.get_sform(), sform)
    np.testing.assert_allclose(written.get_qform(), qform, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(written.dataobj), labels)


def test_mask_for_sform_only_source(tmp_path):
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    image = nib.Nifti1Image(np.zeros((5, 5, 5), np.float32), affine)
    image.set_qform(None, code=0)
    image.set_sform(affine, code=2)
    nib.save(image, tmp_path / "src.nii.gz")
    volume = read_nifti(tmp_path / "src.nii.gz")
    written = nib.load(write_mask(np.ones((5, 5, 5), np.uint8), volume, tmp_path / "m.nii.gz"))
    assert int(written.header["qform_code"]) == 0 and int(written.header["sform_code"]) == 2
    np.testing.assert_allclose(written.affine, affine)
