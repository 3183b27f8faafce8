"""Studies by reference from a PACS over DICOMweb, and results back to it (dicomweb-client).

A reference is a study or series URL, ``http(s)://HOST/.../studies/<StudyUID>[/series/<SeriesUID>]``; the part
before ``/studies`` is the server's DICOMweb root. Series are found with QIDO-RS and their instances fetched with
WADO-RS as stored (any transfer syntax: the local reader decodes them) into a cache keyed by SOP Instance UID
(``<cache>/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm``), so a second run of the same reference fetches no
instance again; files appear in the cache only whole (written aside, then renamed). Series of non-image objects
(SEG, RTSTRUCT, SR...) are not fetched: the reader would set them aside anyway. The cached study or series folder
then goes through the ordinary DICOM reader, so series selection, checks and error codes are unchanged.

Results go back with STOW-RS, and the server is asked afterwards whether it lists each stored instance.

Credentials come from options or the environment (``TESSERA_DICOMWEB_USER`` / ``TESSERA_DICOMWEB_PASSWORD`` for
HTTP basic, ``TESSERA_DICOMWEB_TOKEN`` for a bearer token); user and password written into a URL are used but
never logged (``redacted``). Errors are coded: ``PACS_UNREACHABLE`` (connection, timeout, server error),
``PACS_NOT_FOUND`` (no such study or series), ``PACS_REJECTED`` (credentials refused, a store refused or not
listed afterwards).
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pydicom
import requests

from pipelines.errors import TesseraError

log = logging.getLogger(__name__)

_REFERENCE = re.compile(r"^(?P<root>https?://.+?)/studies/(?P<study>[0-9.]+)(?:/series/(?P<series>[0-9.]+))?/?$")
NON_IMAGE_MODALITIES = frozenset({"SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "SR", "KO", "PR", "REG", "DOC"})
_AS_STORED = (("application/dicom", "*"),)
STUDY_UID, SERIES_UID, SOP_UID, MODALITY = "0020000D", "0020000E", "00080018", "00080060"


class PacsError(TesseraError):
    """A PACS that could not be reached, had no such study, or refused what was asked."""


@dataclass(frozen=True)
class DicomWebReference:
    """A study, or one series of it, on a DICOMweb server."""

    root: str
    study: str
    series: str | None = None

    @property
    def case_id(self) -> str:
        return self.series or self.study

    def __str__(self) -> str:
        return redacted(f"{self.root}/studies/{self.study}" + (f"/series/{self.series}" if self.series else ""))


def parse_reference(text: str) -> DicomWebReference | None:
    """The reference a study or series URL names; ``None`` for anything else (a local path)."""
    match = _REFERENCE.match(text.strip())
    if match is None:
        return None
    return DicomWebReference(match["root"], match["study"], match["series"])


def redacted(url: str) -> str:
    """``url`` without user and password, for logs and messages."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


@dataclass(frozen=True)
class Credentials:
    """HTTP basic (user + password) or a bearer token; never printed (``repr`` hides them)."""

    user: str | None = None
    password: str | None = None
    token: str | None = None

    def __repr__(self) -> str:
        kind = "token" if self.token else ("basic" if self.user else "none")
        return f"Credentials({kind})"

    @classmethod
    def from_environment(cls, user: str | None = None, password: str | None = None,
                         token: str | None = None) -> Credentials:
        """Options first, then TESSERA_DICOMWEB_USER / _PASSWORD / _TOKEN."""
        env = os.environ
        return cls(user or env.get("TESSERA_DICOMWEB_USER"), password or env.get("TESSERA_DICOMWEB_PASSWORD"),
                   token or env.get("TESSERA_DICOMWEB_TOKEN"))


@dataclass(frozen=True)
class Transport:
    """The timeout (seconds) and the attempts of every request."""

    timeout_s: float = 30.0
    retries: int = 3


def _session(url: str, credentials: Credentials) -> requests.Session:
    session = requests.Session()
    parts = urlsplit(url)
    if credentials.token:
        session.headers["Authorization"] = f"Bearer {credentials.token}"
    elif credentials.user:
        session.auth = (credentials.user, credentials.password or "")
    elif parts.username:
        session.auth = (parts.username, parts.password or "")
    return session


class DicomWebServer:
    """One DICOMweb server: search (QIDO-RS), fetch (WADO-RS) into the cache, store (STOW-RS)."""

    def __init__(self, root: str, credentials: Credentials | None = None, transport: Transport | None = None) -> None:
        from dicomweb_client.api import DICOMwebClient

        transport = transport or Transport()
        self.name = redacted(root)
        self._client = DICOMwebClient(redacted(root), session=_session(root, credentials or Credentials()),
                                      timeout=transport.timeout_s)
        # connection errors and 408/429/503/504 are tried again, with exponential waits from 0.25 s
        self._client.set_http_retry_params(retry=transport.retries > 1, max_attempts=max(transport.retries, 1),
                                           wait_exponential_multiplier=250)

    @contextmanager
    def _asking(self, what: str) -> Iterator[None]:
        """Transport and HTTP failures as coded errors that name the server, never its credentials."""
        try:
            yield
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else 0
            if status == 404:
                raise PacsError("PACS_NOT_FOUND", f"{self.name}: {what}: not found (HTTP 404)") from None
            if status in (401, 403):
                raise PacsError("PACS_REJECTED", f"{self.name}: {what}: credentials refused (HTTP {status})") from None
            if 400 <= status < 500:
                raise PacsError("PACS_REJECTED", f"{self.name}: {what}: refused (HTTP {status})") from None
            raise PacsError("PACS_UNREACHABLE", f"{self.name}: {what}: server error (HTTP {status})") from None
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise PacsError("PACS_UNREACHABLE", f"{self.name}: {what}: {type(exc).__name__}") from None
        except requests.RequestException as exc:
            raise PacsError("PACS_UNREACHABLE", f"{self.name}: {what}: {type(exc).__name__}") from None

    def image_series(self, reference: DicomWebReference) -> list[str]:
        """The series to fetch: the one named, or every image series of the study."""
        with self._asking(f"search study {reference.study}"):
            found = self._client.search_for_series(reference.study, fields=["Modality"])
        series = {_value(item, SERIES_UID): _value(item, MODALITY) for item in found}
        if reference.series is not None:
            if reference.series not in series:
                raise PacsError("PACS_NOT_FOUND", f"{self.name}: study {reference.study} has no series "
                                                  f"{reference.series}")
            return [reference.series]
        images = [uid for uid, modality in series.items() if modality not in NON_IMAGE_MODALITIES]
        if not images:
            raise PacsError("PACS_NOT_FOUND", f"{self.name}: no study {reference.study}" if not series
                            else f"{self.name}: study {reference.study} has no image series")
        return images

    def instance_uids(self, study: str, series: str) -> list[str]:
        with self._asking(f"search series {series}"):
            found = self._client.search_for_instances(study, series, fields=["SOPInstanceUID"], get_remaining=True)
        return [_value(item, SOP_UID) for item in found]

    def fetch(self, reference: DicomWebReference, cache: Path) -> Path:
        """The reference's instances in ``cache`` (only those not there yet are fetched); its folder there."""
        fetched = kept = 0
        for series in self.image_series(reference):
            folder = cache / reference.study / series
            wanted = self.instance_uids(reference.study, series)
            missing = [uid for uid in wanted if not (folder / f"{uid}.dcm").is_file()]
            kept += len(wanted) - len(missing)
            if not missing:
                continue
            folder.mkdir(parents=True, exist_ok=True)
            if len(missing) == len(wanted):
                with self._asking(f"fetch series {series}"):
                    for dataset in self._client.iter_series(reference.study, series, media_types=_AS_STORED):
                        _keep(dataset, folder)
                        fetched += 1
            else:
                for uid in missing:
                    with self._asking(f"fetch instance {uid}"):
                        _keep(self._client.retrieve_instance(reference.study, series, uid, media_types=_AS_STORED),
                              folder)
                    fetched += 1
        log.info("%s: %d instance(s) fetched, %d already in the cache", reference, fetched, kept)
        return cache / reference.study / reference.series if reference.series else cache / reference.study

    def store(self, paths: Sequence[Path]) -> list[str]:
        """Store DICOM files with STOW-RS and check that the server then lists each; their SOP Instance UIDs."""
        datasets = [pydicom.dcmread(path) for path in paths]
        with self._asking("store"):
            response = self._client.store_instances(datasets)
        failed = response.get("FailedSOPSequence") if response is not None else None
        if failed:
            reasons = sorted({str(item.get("FailureReason", "?")) for item in failed})
            raise PacsError("PACS_REJECTED", f"{self.name}: refused {len(failed)} instance(s) (failure reason "
                                             f"{', '.join(reasons)})")
        for dataset in datasets:
            with self._asking(f"look up stored instance {dataset.SOPInstanceUID}"):
                listed = self._client.search_for_instances(
                    dataset.StudyInstanceUID, dataset.SeriesInstanceUID,
                    search_filters={"SOPInstanceUID": dataset.SOPInstanceUID})
            if not listed:
                raise PacsError("PACS_REJECTED", f"{self.name}: accepted {dataset.Modality} "
                                                 f"{dataset.SOPInstanceUID} but does not list it")
        log.info("%s: stored and listed %s", self.name, ", ".join(d.Modality for d in datasets))
        return [str(d.SOPInstanceUID) for d in datasets]


def _value(item: dict[str, Any], tag: str) -> str:
    values = item.get(tag, {}).get("Value") or [""]
    return str(values[0])


def _keep(dataset: pydicom.Dataset, folder: Path) -> None:
    """One fetched instance into the cache, whole or not at all (a partial file of its own: two workers may
    fetch the same study at once)."""
    handle, name = tempfile.mkstemp(dir=folder, prefix=".", suffix=".partial")
    partial = Path(name)
    try:
        with os.fdopen(handle, "wb") as out:
            pydicom.dcmwrite(out, dataset, enforce_file_format=True)
        partial.replace(folder / f"{dataset.SOPInstanceUID}.dcm")
    finally:
        partial.unlink(missing_ok=True)


def default_cache() -> Path:
    """``$TESSERA_DICOMWEB_CACHE``, else ``$TESSERA_HOME/dicomweb-cache`` (``~/.tessera``)."""
    if "TESSERA_DICOMWEB_CACHE" in os.environ:
        return Path(os.environ["TESSERA_DICOMWEB_CACHE"]).expanduser()
    return Path(os.environ.get("TESSERA_HOME", "~/.tessera")).expanduser() / "dicomweb-cache"


__all__ = ["Credentials", "DicomWebReference", "DicomWebServer", "PacsError", "Transport", "default_cache",
           "parse_reference", "redacted"]
