"""Cases by reference from a PACS and their results pushed back: the batch side of DICOMweb.

Command-line inputs that are DICOMweb study or series URLs are fetched into the cache (see
``pipelines.ingestion.dicomweb``) and become ordinary DICOM folder cases; a reference that cannot be fetched
fails alone, with its code, and the rest of the run goes on. With ``push``, each succeeded case's DICOM-SEG (and
RTSTRUCT when one was written) is stored back on the server it came from; a push that fails turns the case into a
failure with the PACS code (its local outputs stay).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.cases import CaseInput
from pipelines.ingestion.dicomweb import (
    Credentials,
    DicomWebReference,
    DicomWebServer,
    PacsError,
    Transport,
    parse_reference,
)
from pipelines.segment import CaseResult

log = logging.getLogger(__name__)
PUSHED_OBJECTS = ("seg.dcm", "rtstruct.dcm")


def split_inputs(inputs: Sequence[str]) -> tuple[list[str], list[DicomWebReference]]:
    """Local paths and DICOMweb references, each in command-line order."""
    paths, references = [], []
    for text in inputs:
        reference = parse_reference(text)
        if reference is None:
            paths.append(text)
        else:
            references.append(reference)
    return paths, references


def pushable(case_dir: Path) -> list[Path]:
    """The DICOM objects of a finished case that go back to the PACS."""
    return [case_dir / name for name in PUSHED_OBJECTS if (case_dir / name).is_file()]


@dataclass
class PacsRun:
    """The references of one run, the servers they name (one client per DICOMweb root) and the cache."""

    cache: Path
    credentials: Credentials = field(default_factory=Credentials)
    transport: Transport = field(default_factory=Transport)
    push: bool = False
    _servers: dict[str, DicomWebServer] = field(default_factory=dict)
    _origin: dict[str, DicomWebReference] = field(default_factory=dict)

    def server(self, reference: DicomWebReference) -> DicomWebServer:
        if reference.root not in self._servers:
            self._servers[reference.root] = DicomWebServer(reference.root, self.credentials, self.transport)
        return self._servers[reference.root]

    def fetch(self, references: Iterable[DicomWebReference], output: Path) -> tuple[list[CaseInput],
                                                                                      list[CaseResult]]:
        """Cases for the references that could be fetched, failed results for those that could not."""
        cases: list[CaseInput] = []
        failures: list[CaseResult] = []
        for reference in references:
            started = time.perf_counter()
            try:
                folder = self.server(reference).fetch(reference, self.cache)
            except PacsError as exc:
                failures.append(CaseResult(reference.case_id, "failed", output / reference.case_id, exc.code,
                                           exc.message, time.perf_counter() - started))
                continue
            cases.append(CaseInput(reference.case_id, (folder,)))
            self._origin[reference.case_id] = reference
        return cases, failures

    def pushed(self, results: Iterable[CaseResult]) -> Iterator[CaseResult]:
        """``results`` as they come, each succeeded case from a reference pushed back first (with ``push``)."""
        for result in results:
            reference = self._origin.get(result.case_id)
            if self.push and reference is not None and result.status == "succeeded":
                result = self._push(reference, result)
            yield result

    def _push(self, reference: DicomWebReference, result: CaseResult) -> CaseResult:
        objects = pushable(result.output_dir)
        if not objects:
            return dataclasses.replace(result, status="failed", error_code="PACS_REJECTED",
                                       error_message="nothing to push: the case has no DICOM-SEG or RTSTRUCT")
        try:
            self.server(reference).store(objects)
        except PacsError as exc:
            return dataclasses.replace(result, status="failed", error_code=exc.code, error_message=exc.message)
        log.info("%s: pushed %s to %s", result.case_id, ", ".join(p.name for p in objects),
                 self.server(reference).name)
        return result


__all__ = ["PUSHED_OBJECTS", "PacsRun", "pushable", "split_inputs"]
