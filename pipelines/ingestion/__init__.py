"""Reading what users have: NIfTI files now, DICOM series in ``pipelines.ingestion.dicom``."""

from pipelines.ingestion.nifti import NIFTI_SUFFIXES, is_nifti, read_nifti

__all__ = ["NIFTI_SUFFIXES", "is_nifti", "read_nifti"]
