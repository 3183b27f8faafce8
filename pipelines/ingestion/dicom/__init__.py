"""DICOM ingestion: study folders, zips and multi-frame files to volumes, refusing what is not right.

Conventions: volumes come out indexed ``[column, row, slice]`` (as dcm2niix and dicom2nifti store them)
with a RAS+ affine (DICOM's LPS patient coordinates with x and y negated). Voxel values are the DICOM
"modality" values: stored values x RescaleSlope + RescaleIntercept (per frame where given). Philips'
private floating-point scaling (2005,100E) is *not* applied; it is recorded in the sidecar.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DicomStudy", "SeriesSelection", "read_study", "select_series"]


def __getattr__(name: str) -> Any:
    # Lazy: ``sources`` (finding files, checking zips) is used without torch/MONAI, e.g. by the REST service.
    if name in ("DicomStudy", "read_study"):
        from pipelines.ingestion.dicom import reader

        return getattr(reader, name)
    if name in ("SeriesSelection", "select_series"):
        from pipelines.ingestion.dicom import selection

        return getattr(selection, name)
    raise AttributeError(name)
