"""Turning command-line inputs into cases: one file a case, a folder of files a case each."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from pipelines.errors import UsageError
from pipelines.ingestion.nifti import case_id_for, is_nifti

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CaseInput:
    case_id: str
    path: Path


def discover_cases(inputs: list[str | Path]) -> list[CaseInput]:
    """Cases in command-line order; a folder contributes its NIfTI files (sorted, non-recursive).

    A path that does not exist, or two cases with the same name, is a usage error: nothing runs.
    """
    cases: list[CaseInput] = []
    for raw in inputs:
        path = Path(raw).expanduser()
        if not path.exists():
            raise UsageError("INPUT_NOT_FOUND", f"{raw}: no such file or folder")
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
            nifti = [p for p in files if is_nifti(p)]
            ignored = len(files) - len(nifti)
            if ignored:
                log.info("%s: ignoring %d file(s) that are not NIfTI", path.name, ignored)
            cases.extend(CaseInput(case_id_for(p), p) for p in nifti)
        else:
            cases.append(CaseInput(case_id_for(path), path))
    seen: dict[str, Path] = {}
    for case in cases:
        if case.case_id in seen:
            raise UsageError(
                "DUPLICATE_CASE", f"two inputs map to case '{case.case_id}': {seen[case.case_id]} and {case.path}"
            )
        seen[case.case_id] = case.path
    return cases
