"""Every volume ``tessera convert`` makes of the real series in ../shared gets a DICOM-SEG of a simple mask that
dciodvfy accepts, that reads back as the mask, and whose every foreground pixel lies, in world space, within
0.1 mm of a voxel of the mask (checked from the SEG's own plane positions, not through highdicom)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pydicom
import pytest

from models.manifest import Label
from pipelines.ingestion.dicom.reader import load_volume, read_study
from pipelines.ingestion.dicom.series import VolumeCandidate
from pipelines.writers.seg import SegAlgorithm, read_seg_labels, write_dicom_seg
from tests.conftest import dciodvfy_errors

SOURCES = ("dicom2nifti/tests/data", "dcm_qa_enh/In", "dcm_qa_xa30/In", "dcm_qa_ts/In", "dcm_qa_ct/In",
           "totalsegmentator/tests/reference_files/example_ct_dicom")
LABELS = [Label(1, "bright"), Label(2, "brightest")]
WORLD_TOLERANCE_MM = 0.1


def _study_folders() -> list[str]:
    """Folders holding DICOM files directly (``failing/`` series are refused by design, tested elsewhere)."""
    root = Path(os.environ.get("TESSERA_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    folders = set()
    for source in SOURCES:
        for path in sorted((root / source).rglob("*")):
            if path.is_file() and "failing" not in path.parts and _is_dicom(path):
                folders.add(str(path.parent.relative_to(root)))
    return sorted(folders) or ["(no ../shared data)"]


def _is_dicom(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(132)[128:132] == b"DICM"


def _threshold_mask(array: np.ndarray) -> np.ndarray:
    data = array.astype(np.float32)
    if data.ndim == 4:  # colour
        data = data.mean(axis=0)
    labels = np.zeros(data.shape, np.uint8)
    labels[data > np.percentile(data, 70)] = 1
    labels[data > np.percentile(data, 95)] = 2
    return labels


def _world_offsets_mm(seg_path: Path, labels: np.ndarray, affine: np.ndarray) -> tuple[float, int]:
    """For every foreground pixel of every SEG frame: its LPS centre from the frame's own plane position and
    orientation, mapped into the mask's voxel grid; returns the largest distance to the nearest voxel centre
    and the number of pixels whose nearest voxel does not hold the segment's label."""
    seg = pydicom.dcmread(seg_path)
    shared = seg.SharedFunctionalGroupsSequence[0]
    numbers = {int(item.SegmentNumber): int(item.SegmentNumber) for item in seg.SegmentSequence}
    frames = seg.pixel_array.reshape(-1, int(seg.Rows), int(seg.Columns))
    to_voxel = np.linalg.inv(affine)
    worst, wrong = 0.0, 0
    for frame, groups in zip(frames, seg.PerFrameFunctionalGroupsSequence, strict=True):
        def value(sequence: str, keyword: str, groups=groups):  # type: ignore[no-untyped-def]
            for source in (groups, shared):
                if sequence in source:
                    return source[sequence][0].get(keyword)
            return None

        position = np.asarray(value("PlanePositionSequence", "ImagePositionPatient"), float)
        orientation = np.asarray(value("PlaneOrientationSequence", "ImageOrientationPatient"), float)
        row_spacing, column_spacing = (float(v) for v in value("PixelMeasuresSequence", "PixelSpacing"))
        segment = numbers[int(groups.SegmentIdentificationSequence[0].ReferencedSegmentNumber)]
        rows, columns = np.nonzero(frame)
        lps = (position[None] + columns[:, None] * column_spacing * orientation[None, :3]
               + rows[:, None] * row_spacing * orientation[None, 3:])
        ras = lps * np.array([-1.0, -1.0, 1.0])
        index = (to_voxel[:3, :3] @ ras.T).T + to_voxel[:3, 3]
        nearest = np.rint(index).astype(int)
        inside = np.all((nearest >= 0) & (nearest < np.asarray(labels.shape)), axis=1)
        wrong += int((~inside).sum())
        nearest = nearest[inside]
        offsets = (affine[:3, :3] @ (index[inside] - nearest).T).T
        if len(offsets):
            worst = max(worst, float(np.linalg.norm(offsets, axis=1).max()))
        wrong += int((labels[tuple(nearest.T)] != LABELS[segment - 1].value).sum())
    return worst, wrong


def _check_seg(candidate: VolumeCandidate, out: Path) -> None:
    volume = load_volume(candidate)
    labels = _threshold_mask(volume.array)
    seg_path = write_dicom_seg(labels, candidate, LABELS, SegAlgorithm("tessera-sweep", "1"),
                               out / f"{candidate.suffix or 'volume'}.dcm")
    assert dciodvfy_errors(seg_path, "Segmentation") == [], candidate.label
    np.testing.assert_array_equal(read_seg_labels(seg_path, candidate, [1, 2]), labels)
    worst, wrong = _world_offsets_mm(seg_path, labels, volume.affine)
    assert wrong == 0, f"{candidate.label}: {wrong} SEG pixels off the mask in world space"
    assert worst <= WORLD_TOLERANCE_MM, f"{candidate.label}: a SEG pixel {worst:.3f} mm from its voxel"


@pytest.mark.parametrize("folder", _study_folders())
def test_every_converted_shared_volume_gets_a_valid_seg_that_lies_on_the_mask(shared_data: Path, tmp_path: Path,
                                                                              folder: str) -> None:
    study = read_study(shared_data / folder)
    if not study.volumes:
        codes = sorted({code for refused in study.refused for code in refused.codes})
        pytest.skip(f"{folder}: tessera convert makes no volume of it ({codes})")
    for number, candidate in enumerate(study.volumes):
        out = tmp_path / str(number)
        out.mkdir()
        _check_seg(candidate, out)
