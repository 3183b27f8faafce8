"""Turning command-line inputs into cases.

- a NIfTI file, a zip or a DICOM file is one case; a folder of DICOM files (any depth) is one case;
- a folder of cases contributes each NIfTI file, each zip and each sub-folder holding DICOM;
- for a model of several channels, NIfTI files named ``<case>_0000.nii.gz``, ``<case>_0001.nii.gz``
  (the nnU-Net convention) are one case with its channels in that order.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pipelines.errors import UsageError
from pipelines.ingestion.dicom.reader import is_dicom_input
from pipelines.ingestion.dicom.sources import looks_like_dicom
from pipelines.ingestion.nifti import case_id_for, is_nifti

log = logging.getLogger(__name__)
_CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass(frozen=True)
class CaseInput:
    case_id: str
    paths: tuple[Path, ...]

    @property
    def path(self) -> Path:
        return self.paths[0]


def _has_dicom_files(folder: Path) -> bool:
    return any(p.is_file() and not is_nifti(p) and looks_like_dicom(p) for p in folder.iterdir())


def _case_name(path: Path) -> str:
    return case_id_for(path) if is_nifti(path) else (path.stem if path.suffix.lower() == ".zip" else path.name)


def _folder_cases(folder: Path) -> list[CaseInput]:
    if _has_dicom_files(folder):
        return [CaseInput(folder.name, (folder,))]
    cases: list[CaseInput] = []
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    ignored = 0
    for entry in entries:
        if entry.is_file() and (is_nifti(entry) or entry.suffix.lower() == ".zip"):
            cases.append(CaseInput(_case_name(entry), (entry,)))
        elif entry.is_dir() and is_dicom_input(entry):
            cases.append(CaseInput(entry.name, (entry,)))
        else:
            ignored += 1
    if ignored:
        log.info("%s: ignoring %d entr%s that are neither NIfTI, zip nor DICOM folders", folder.name, ignored,
                 "y" if ignored == 1 else "ies")
    return cases


def _group_channels(cases: list[CaseInput], channels: int) -> list[CaseInput]:
    """``X_0000``, ``X_0001``... NIfTI files become one case ``X`` with its channels in order."""
    grouped: dict[str, dict[int, Path]] = defaultdict(dict)
    rest: list[CaseInput] = []
    for case in cases:
        match = _CHANNEL_SUFFIX.match(case.case_id)
        if match and is_nifti(case.path):
            grouped[match["case"]][int(match["channel"])] = case.path
        else:
            rest.append(case)
    for case_id, files in sorted(grouped.items()):
        if sorted(files) != list(range(channels)):
            raise UsageError("CHANNELS_INCOMPLETE", f"case '{case_id}' has channel files {sorted(files)}; "
                                                    f"the model needs {list(range(channels))}")
        rest.append(CaseInput(case_id, tuple(files[i] for i in range(channels))))
    return rest


def discover_cases(inputs: Sequence[str | Path], channels: int = 1) -> list[CaseInput]:
    """Cases in command-line order. A path that does not exist, or two cases with one name, is a usage error."""
    cases: list[CaseInput] = []
    for raw in inputs:
        path = Path(raw).expanduser()
        if not path.exists():
            raise UsageError("INPUT_NOT_FOUND", f"{raw}: no such file or folder")
        cases.extend(_folder_cases(path) if path.is_dir() else [CaseInput(_case_name(path), (path,))])
    if channels > 1:
        cases = _group_channels(cases, channels)
    seen: dict[str, Path] = {}
    for case in cases:
        if case.case_id in seen:
            raise UsageError("DUPLICATE_CASE",
                             f"two inputs map to case '{case.case_id}': {seen[case.case_id]} and {case.path}")
        seen[case.case_id] = case.path
    return cases
