import gzip

import nibabel as nib
import numpy as np
import pytest

from pipelines.errors import InputError
from pipelines.ingestion.nifti import read_nifti


def _save(tmp_path, data, name="v.nii.gz", affine=None):
    path = tmp_path / name
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 3.0, 1.0]) if affine is None else affine), path)
    return path


def test_reads_3d_with_affine_and_codes(tmp_path):
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    volume = read_nifti(_save(tmp_path, data))
    assert volume.array.dtype == np.float32
    np.testing.assert_array_equal(volume.array, data)
    np.testing.assert_allclose(volume.affine, np.diag([2.0, 2.0, 3.0, 1.0]))
    assert volume.spacing == (2.0, 2.0, 3.0)
    assert volume.metadata.case_id == "v"


def test_uncompressed_and_single_volume_4d(tmp_path):
    data = np.random.default_rng(0).normal(size=(4, 5, 6, 1)).astype(np.float32)
    volume = read_nifti(_save(tmp_path, data, "x.nii"))
    assert volume.array.shape == (4, 5, 6)
    assert volume.metadata.case_id == "x"


def test_multi_volume_4d_is_refused(tmp_path):
    with pytest.raises(InputError) as info:
        read_nifti(_save(tmp_path, np.zeros((4, 5, 6, 3), np.float32)))
    assert info.value.code == "NIFTI_MULTI_VOLUME"
    assert "3 volumes" in info.value.message


def test_2d_is_refused(tmp_path):
    with pytest.raises(InputError) as info:
        read_nifti(_save(tmp_path, np.zeros((4, 5), np.float32)))
    assert info.value.code == "NIFTI_NOT_3D"


def test_truncated_file_is_refused(tmp_path):
    path = _save(tmp_path, np.random.default_rng(1).normal(size=(30, 30, 30)).astype(np.float32))
    raw = gzip.decompress(path.read_bytes())
    truncated = tmp_path / "t.nii.gz"
    truncated.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    with pytest.raises(InputError) as info:
        read_nifti(truncated)
    assert info.value.code == "NIFTI_UNREADABLE"
    assert "t.nii.gz" in info.value.message


def test_garbage_and_missing_files(tmp_path):
    garbage = tmp_path / "g.nii.gz"
    garbage.write_bytes(b"this is not an image at all" * 20)
    with pytest.raises(InputError) as info:
        read_nifti(garbage)
    assert info.value.code == "NIFTI_UNREADABLE"
    with pytest.raises(InputError) as info:
        read_nifti(tmp_path / "absent.nii.gz")
    assert info.value.code == "INPUT_NOT_FOUND"


def test_singular_affine_is_refused(tmp_path):
    affine = np.eye(4)
    affine[2, 2] = 0.0
    image = nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), None)
    image.set_sform(affine, code=1)
    nib.save(image, tmp_path / "s.nii.gz")
    with pytest.raises(InputError) as info:
        read_nifti(tmp_path / "s.nii.gz")
    assert info.value.code == "NIFTI_BAD_AFFINE"


def test_non_finite_voxels_are_replaced(tmp_path):
    data = np.ones((4, 5, 6), np.float32)
    data[0, 0, 0] = np.nan
    data[1, 1, 1] = -5
    volume = read_nifti(_save(tmp_path, data))
    assert np.isfinite(volume.array).all()
    assert volume.array[0, 0, 0] == -5


def test_coded_errors_survive_pickling():
    """Worker processes and distributed executors send errors back pickled: code and message must survive."""
    import pickle

    from pipelines.ingestion.dicom.geometry import GeometryError

    error = pickle.loads(pickle.dumps(InputError("NIFTI_UNREADABLE", "x.nii: broken")))
    assert (type(error), error.code, error.message) == (InputError, "NIFTI_UNREADABLE", "x.nii: broken")
    geometry = pickle.loads(pickle.dumps(GeometryError([("MISSING_SLICES", "gap"), ("GANTRY_TILT", "tilt")])))
    assert geometry.codes == ["MISSING_SLICES", "GANTRY_TILT"] and geometry.code == "MISSING_SLICES"
