"""The REST service: ``create_app(settings)`` builds the FastAPI application (``tessera serve`` runs it).

Uploads become jobs in the SQLite store; worker processes run them through the same pipeline as the CLI.
Every ``/v1`` route needs ``Authorization: Bearer <key>`` (unless auth is off on a loopback address), and
a key sees only its own jobs.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from app.jobs.keys import authenticate
from app.jobs.store import Job, JobStore
from app.jobs.worker import WorkerPool, job_dir, recover_data_dir, remove_job_files, result_dir
from app.service import schemas
from app.service.problems import (
    HeadAsGet,
    ProblemError,
    RequestBodyLimits,
    install_problem_handlers,
    problem_response,
    problem_responses,
)
from app.service.settings import ServiceSettings
from app.service.uploads import StoredUpload, store_upload
from models.manifest import ModelManifest
from pipelines.errors import UsageError

log = logging.getLogger(__name__)
LOCAL_OWNER = "local"
_JOB_ID = re.compile(r"^[0-9a-f]{32}$")
_MEDIA_TYPES = {".gz": "application/gzip", ".dcm": "application/dicom", ".png": "image/png",
                ".json": "application/json", ".csv": "text/csv"}
_FORM_FIELDS = ("model", "formats", "seg_type", "series", "tilt", "keep_largest", "steps", "members", "seed")
_SAMPLING_FIELDS = ("steps", "members", "seed")
_PACS_FIELDS = ("pacs", "study", "series", "push")
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_MAX_JSON_BYTES = 64 * 1024
_UPLOAD_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": {
            "type": "object",
            "required": ["file"],
            "properties": {
                "file": {"type": "array", "items": {"type": "string", "format": "binary"},
                         "description": "one NIfTI file, a zip of a DICOM study, one DICOM file, or one NIfTI per "
                                        "channel in the model's channel order (repeat the part)"},
                "model": {"type": "string", "description": "a model from GET /v1/models (default: the default)"},
                "formats": {"type": "string", "description": "comma-separated: nifti, dicom-seg, rtstruct, "
                                                             "probabilities, stats, preview"},
                "seg_type": {"type": "string", "enum": ["binary", "fractional"]},
                "series": {"type": "string", "description": "DICOM: SeriesInstanceUID or SeriesNumber to use"},
                "tilt": {"type": "string", "enum": ["refuse", "resample"]},
                "keep_largest": {"type": "boolean"},
                "steps": {"type": "integer", "description": "sampling families (diffusion): DDIM steps (default: "
                                                           "the model's; on a CPU worker its CPU budget)"},
                "members": {"type": "integer", "description": "sampling families: ensemble members"},
                "seed": {"type": "integer", "description": "sampling families: the seed (recorded in report.json)"},
            },
        }}, "application/json": {"schema": {
            "type": "object",
            "required": ["pacs", "study"],
            "description": "a study (or one series) on a PACS the server is configured with: fetched with DICOMweb, "
                           "segmented, and with push the DICOM-SEG stored back (STOW-RS)",
            "properties": {
                "pacs": {"type": "string", "description": "a PACS name from the server's settings"},
                "study": {"type": "string", "description": "StudyInstanceUID"},
                "series": {"type": "string", "description": "SeriesInstanceUID (default: the study's best series)"},
                "push": {"type": "boolean", "description": "store the DICOM-SEG back on the PACS"},
                "model": {"type": "string"},
                "formats": {"type": "string"},
                "seg_type": {"type": "string", "enum": ["binary", "fractional"]},
                "tilt": {"type": "string", "enum": ["refuse", "resample"]},
                "keep_largest": {"type": "boolean"},
                "steps": {"type": "integer"},
                "members": {"type": "integer"},
                "seed": {"type": "integer"},
            },
        }}},
    }
}


class ServiceState:
    """What the routes share: settings, the store, the worker pool."""

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self.store = JobStore(settings.database)
        self.pool = WorkerPool(settings, self.store)
        self._lock_handle: Any = None

    def lock_data_dir(self) -> None:
        """One server per data directory: two would both re-queue 'running' jobs."""
        if self._lock_handle is not None:
            return
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        handle = (self.settings.data_dir / "server.lock").open("w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise UsageError("DATA_DIR_IN_USE", f"another server uses {self.settings.data_dir}") from None
        handle.write(str(os.getpid()))
        handle.flush()
        self._lock_handle = handle


def _state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.tessera
    return state


_bearer = HTTPBearer(auto_error=False, description="an API key from `tessera keys create`")


def owner_of(request: Request,
             credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)] = None) -> str:
    """The caller: the id of a live API key (or 'local' with auth off on loopback)."""
    state = _state(request)
    if not state.settings.auth:
        return LOCAL_OWNER
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None:
        raise ProblemError(401, "AUTH_REQUIRED", "send an API key: 'Authorization: Bearer <key>'", challenge)
    key = authenticate(state.store, credentials.credentials)
    if key is None:
        raise ProblemError(401, "AUTH_INVALID", "unknown or revoked API key", challenge)
    return key.id


Owner = Annotated[str, Depends(owner_of)]


def _own_job(state: ServiceState, job_id: str, owner: str) -> Job:
    """The caller's job; anyone else's (or none) is 404, so ids reveal nothing."""
    job = state.store.get(job_id) if _JOB_ID.match(job_id) else None
    if job is None or job.owner != owner or job.delete_requested:
        raise ProblemError(404, "JOB_NOT_FOUND", f"no job {job_id[:64]!r}")
    return job


def _job_info(state: ServiceState, job: Job) -> schemas.JobInfo:
    url = f"/v1/jobs/{job.id}"
    artifacts = []
    folder = result_dir(state.settings, job.id)
    for name in job.artifacts if job.state == "succeeded" else []:
        try:
            size = (folder / name).stat().st_size
        except OSError:
            continue
        artifacts.append(schemas.Artifact(name=name, url=f"{url}/artifacts/{name}", bytes=size))
    error = schemas.ErrorInfo(code=job.error_code, message=job.error_message or "") if job.error_code else None
    return schemas.JobInfo(
        id=job.id, url=url, state=job.state, stage=job.stage, progress=round(job.progress, 4), model=job.model,
        formats=job.options.get("formats"), created_at=job.created_at, started_at=job.started_at,
        finished_at=job.finished_at, queue_position=state.store.queue_position(job), attempts=job.attempts,
        warnings=job.warnings,
        error=error, timings_s=job.timings, artifacts=artifacts, expired=job.purged_at is not None)


def _form_text(form: Any, name: str) -> str | None:
    value = form.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ProblemError(422, "REQUEST_INVALID", f"form field '{name}' must be text, not a file")
    return value.strip() or None


def _models(settings: ServiceSettings) -> tuple[ModelManifest, dict[str, ModelManifest]]:
    """The default model and every model a job may name (registered ones and the default, by name)."""
    from models.registry import list_manifests, resolve_model

    default = resolve_model(settings.default_model)  # may be a manifest path rather than a registered name
    return default, {m.name: m for m in list_manifests()} | {default.name: default}


def _job_options(state: ServiceState, form: Any, files: int) -> tuple[str, dict[str, Any]]:
    """The model and options of a new job from the form fields, checked before anything is stored."""
    from pipelines.outputs import OutputOptions

    unknown = sorted(set(form.keys()) - {"file", *_FORM_FIELDS})
    if unknown:
        raise ProblemError(422, "REQUEST_INVALID", f"unknown form field(s) {unknown}; known: file, "
                                                   f"{', '.join(_FORM_FIELDS)}")
    default, registered = _models(state.settings)
    name = _form_text(form, "model") or default.name
    if name not in registered:
        raise ProblemError(422, "MODEL_NOT_FOUND", f"no model named {name[:64]!r}; see GET /v1/models")
    manifest = registered[name]
    formats_text = _form_text(form, "formats")
    formats = sorted({f.strip() for f in formats_text.split(",") if f.strip()}) if formats_text else None
    seg_type = _form_text(form, "seg_type") or "binary"
    OutputOptions(formats=frozenset(formats) if formats else None, seg_type=seg_type)  # raises UNKNOWN_FORMAT
    tilt = _form_text(form, "tilt") or "refuse"
    if tilt not in ("refuse", "resample"):
        raise ProblemError(422, "REQUEST_INVALID", "tilt must be refuse or resample")
    keep = (_form_text(form, "keep_largest") or "true").lower()
    if keep not in ("true", "false", "1", "0", "yes", "no"):
        raise ProblemError(422, "REQUEST_INVALID", "keep_largest must be true or false")
    channels = len(manifest.channels)
    if files not in (1, channels):
        raise ProblemError(422, "CHANNEL_COUNT_MISMATCH", f"model '{manifest.name}' takes {channels} channel(s): "
                                                          f"send one file per channel, or one DICOM zip; got {files}")
    options = {"formats": formats, "seg_type": seg_type, "series": _form_text(form, "series"), "tilt": tilt,
               "keep_largest": keep in ("true", "1", "yes"), "sampling": _sampling_options(form, manifest)}
    return manifest.name, options


def _sampling_options(form: Any, manifest: ModelManifest) -> dict[str, int]:
    """steps / members / seed for a model that samples, checked as the CLI checks them."""
    from models.families import checked_sampling, get_family

    run = {}
    for name in _SAMPLING_FIELDS:
        text = _form_text(form, name)
        if text is None:
            continue
        try:
            run[name] = int(text)
        except ValueError:
            raise ProblemError(422, "SAMPLING_INVALID", f"{name} must be an integer, got {text[:32]!r}") from None
    try:
        return checked_sampling(get_family(manifest.family), manifest.name, manifest.network, run)
    except UsageError as exc:
        raise ProblemError(422, exc.code, exc.message) from None


def _retry_after(state: ServiceState) -> str:
    """Seconds until a queue slot is likely free: queued jobs x their recent mean run time / workers."""
    queued = state.store.count_queued()
    wait = queued * state.store.mean_run_seconds() / max(state.pool.slots, 1)
    return str(int(min(max(wait, 1), 3600)))


def _queue_full(state: ServiceState) -> ProblemError:
    return ProblemError(429, "QUEUE_FULL", f"{state.settings.max_queued_jobs} jobs are waiting; try again later",
                        {"Retry-After": _retry_after(state)})


def _accepted(job_id: str) -> JSONResponse:
    url = f"/v1/jobs/{job_id}"
    return JSONResponse(schemas.Accepted(id=job_id, url=url, state="queued").model_dump(), status_code=202,
                        headers={"Location": url})


def _store_inputs(state: ServiceState, uploads: list[UploadFile], folder: Path) -> list[str]:
    settings = state.settings
    partial = folder / "input.partial"
    partial.mkdir(parents=True)
    stored: list[StoredUpload] = [
        store_upload(upload.file, partial, index, settings.zip_max_members, settings.zip_max_bytes)
        for index, upload in enumerate(uploads)]
    kinds = {s.kind for s in stored}
    if len(stored) > 1 and kinds == {"dicom"}:  # loose DICOM files: one study folder
        study = partial / "study"
        study.mkdir()
        for item in stored:
            (partial / item.name).rename(study / item.name)
        names = ["study"]
    elif len(stored) > 1 and kinds != {"nifti"}:
        raise ProblemError(422, "UPLOAD_MIXED", "several files must all be NIfTI (one per channel) or all DICOM")
    else:
        names = [s.name for s in stored]
    partial.rename(folder / "input")
    return names


router = APIRouter(prefix="/v1")


@router.post("/jobs", status_code=202, response_model=schemas.Accepted, openapi_extra=_UPLOAD_SCHEMA,
             summary="Upload a volume and start a segmentation job",
             responses=problem_responses(400, 401, 413, 415, 422, 429))
async def create_job(request: Request, owner: Owner) -> JSONResponse:
    state = _state(request)
    settings = state.settings
    if state.store.count_queued() >= settings.max_queued_jobs:  # before reading the body
        raise _queue_full(state)
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() == "application/json":
        return await _create_pacs_job(request, state, owner)
    if "multipart/form-data" not in content_type:
        raise ProblemError(415, "UNSUPPORTED_MEDIA_TYPE", "send multipart/form-data with one or more 'file' parts, "
                                                          "or a JSON study reference {\"pacs\": ..., \"study\": ...}")
    form = await request.form(max_files=settings.max_files, max_fields=len(_FORM_FIELDS) + 1)
    try:
        uploads = [part for part in form.getlist("file") if isinstance(part, UploadFile)]
        if not uploads:
            raise ProblemError(422, "NO_FILE", "no file part named 'file' in the upload")
        model, options = _job_options(state, form, len(uploads))
        job_id = uuid.uuid4().hex
        folder = job_dir(settings, job_id)
        try:
            inputs = await run_in_threadpool(_store_inputs, state, uploads, folder)
            job = Job(id=job_id, owner=owner, state="queued", model=model, options=options, inputs=inputs,
                      created_at=time.time())
            accepted = await run_in_threadpool(state.store.add_job, job, settings.max_queued_jobs)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        if not accepted:
            shutil.rmtree(folder, ignore_errors=True)
            raise _queue_full(state)
    finally:
        await form.close()
    log.info("job %s: queued (model %s, %d file(s))", job_id, model, len(uploads))
    return _accepted(job_id)


def _json_text(value: Any, name: str) -> str:
    """A JSON member as the form text the upload route checks."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int)):
        return str(value)
    raise ProblemError(422, "REQUEST_INVALID", f"'{name}' must be a string, an integer or a boolean")


def _uid(data: dict[str, Any], name: str, required: bool) -> str | None:
    value = data.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or len(value) > 64 or not _UID.match(value):
        raise ProblemError(422, "REQUEST_INVALID", f"'{name}' must be a DICOM UID (digits and dots, at most 64)")
    return value


def _pacs_reference(state: ServiceState, data: Any) -> dict[str, Any]:
    """The PACS, study, series and push of a JSON job, checked against the server's settings."""
    if not isinstance(data, dict):
        raise ProblemError(422, "REQUEST_INVALID", "the body must be a JSON object")
    unknown = sorted(set(data) - {*_PACS_FIELDS, *_FORM_FIELDS})
    if unknown:
        raise ProblemError(422, "REQUEST_INVALID", f"unknown member(s) {unknown[:8]}; known: "
                                                   f"{', '.join(sorted({*_PACS_FIELDS, *_FORM_FIELDS}))}")
    name = data.get("pacs")
    if not isinstance(name, str) or name not in state.settings.pacs:
        configured = sorted(state.settings.pacs) or "none"
        raise ProblemError(422, "PACS_UNKNOWN", f"no PACS named {str(name)[:64]!r} on this server (configured: "
                                                f"{configured})")
    push = data.get("push", False)
    if not isinstance(push, bool):
        raise ProblemError(422, "REQUEST_INVALID", "'push' must be true or false")
    return {"name": name, "study": _uid(data, "study", True), "series": _uid(data, "series", False), "push": push}


async def _create_pacs_job(request: Request, state: ServiceState, owner: str) -> JSONResponse:
    """A job by reference: the worker fetches the study from the named PACS, segments it and may push the SEG."""
    import json

    body = await request.body()
    if len(body) > _MAX_JSON_BYTES:
        raise ProblemError(413, "REQUEST_TOO_LARGE", f"a JSON job is at most {_MAX_JSON_BYTES} bytes")
    try:
        data = json.loads(body)
    except ValueError:
        raise ProblemError(422, "REQUEST_INVALID", "the body is not valid JSON") from None
    reference = _pacs_reference(state, data)
    form = {k: _json_text(v, k) for k, v in data.items() if k in _FORM_FIELDS and k != "series" and v is not None}
    model, options = _job_options(state, form, 1)
    options["pacs"] = reference
    if reference["push"] and options["formats"] and "dicom-seg" not in options["formats"]:
        options["formats"] = sorted({*options["formats"], "dicom-seg"})
    job_id = uuid.uuid4().hex
    folder = job_dir(state.settings, job_id)
    folder.mkdir(parents=True)
    job = Job(id=job_id, owner=owner, state="queued", model=model, options=options, inputs=[],
              created_at=time.time())
    if not await run_in_threadpool(state.store.add_job, job, state.settings.max_queued_jobs):
        shutil.rmtree(folder, ignore_errors=True)
        raise _queue_full(state)
    log.info("job %s: queued (model %s, study by reference from PACS %s)", job_id, model, reference["name"])
    return _accepted(job_id)


@router.get("/jobs", response_model=schemas.JobList, summary="The caller's jobs, newest first",
            responses=problem_responses(401, 422))
def list_jobs(request: Request, owner: Owner, limit: Annotated[int, Query(ge=1, le=500)] = 50,
              offset: Annotated[int, Query(ge=0, le=10**9)] = 0) -> schemas.JobList:
    state = _state(request)
    return schemas.JobList(jobs=[_job_info(state, job) for job in state.store.list_for(owner, limit, offset)])


@router.get("/jobs/{job_id}", response_model=schemas.JobInfo, summary="A job's state, progress and artifacts",
            responses=problem_responses(401, 404))
def get_job(request: Request, job_id: str, owner: Owner) -> schemas.JobInfo:
    state = _state(request)
    return _job_info(state, _own_job(state, job_id, owner))


@router.get("/jobs/{job_id}/artifacts/{name}", summary="Download a result file",
            response_class=StreamingResponse, responses={200: {"content": {"application/octet-stream": {}}},
                                                    **problem_responses(401, 404, 409, 410)})
def get_artifact(request: Request, job_id: str, name: str, owner: Owner) -> StreamingResponse:
    state = _state(request)
    job = _own_job(state, job_id, owner)
    if job.purged_at is not None:
        raise ProblemError(410, "JOB_EXPIRED", "this job's files were deleted by the retention policy")
    if job.state != "succeeded":
        raise ProblemError(409, "JOB_NOT_SUCCEEDED", f"the job is {job.state}; artifacts exist once it succeeded")
    if name not in job.artifacts:
        raise ProblemError(404, "ARTIFACT_NOT_FOUND", f"no artifact {name[:64]!r}; the job has {job.artifacts}")
    path = result_dir(state.settings, job.id) / name
    try:  # opened before answering: a job deleted meanwhile still sends the whole file it had (POSIX unlink)
        handle = path.open("rb")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise ProblemError(410, "JOB_EXPIRED", "this job's files are gone") from None
    size = os.fstat(handle.fileno()).st_size

    def chunks() -> Iterator[bytes]:
        with handle:
            while block := handle.read(1024 * 1024):
                yield block

    media_type = _MEDIA_TYPES.get(path.suffix.lower(), "application/octet-stream")
    return StreamingResponse(chunks(), media_type=media_type, headers={
        "Content-Length": str(size), "Content-Disposition": f'attachment; filename="{name}"'})


@router.delete("/jobs/{job_id}", status_code=204, summary="Cancel a job if it runs, and delete it with its files",
               responses={202: {"model": schemas.JobInfo, "description": "running: cancel under way, then deleted"},
                          **problem_responses(401, 404)})
def delete_job(request: Request, job_id: str, owner: Owner) -> Response:
    state = _state(request)
    job = _own_job(state, job_id, owner)
    updated = state.store.request_cancel(job.id, delete=True)
    if updated is not None and updated.state == "running":
        log.info("job %s: cancel requested", job.id)
        return JSONResponse(_job_info(state, updated).model_dump(), status_code=202)
    remove_job_files(state.settings, job.id)
    state.store.delete(job.id)
    log.info("job %s: deleted", job.id)
    return Response(status_code=204)


@router.get("/models", response_model=schemas.ModelList, summary="Models jobs can name",
            responses=problem_responses(401))
def list_models(request: Request, owner: Owner) -> schemas.ModelList:
    default, manifests = _models(_state(request).settings)
    return schemas.ModelList(models=[
        schemas.ModelInfo(name=m.name, version=m.version, family=m.family, default=m.name == default.name,
                          channels=[c.name for c in m.channels],
                          labels=[schemas.LabelInfo(value=lbl.value, name=lbl.name) for lbl in m.labels])
        for m in sorted(manifests.values(), key=lambda m: m.name)])


def create_app(settings: ServiceSettings) -> FastAPI:
    """The application for ``settings``; its lifespan locks the data directory and runs the workers."""
    from app.cli.commands import tool_version
    from app.service.page import router as page_router  # the results page (it imports this module)

    settings.apply_input_limits()  # upload checks here, readers in the workers
    state = ServiceState(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.lock_data_dir()
        recover_data_dir(settings, state.store)
        state.pool.start()
        log.info("serving with %d worker(s); data in %s; auth %s", state.pool.slots, settings.data_dir,
                 "on" if settings.auth else "OFF (loopback only)")
        try:
            yield
        finally:
            await asyncio.to_thread(state.pool.stop)

    app = FastAPI(title="Tessera", version=tool_version(), lifespan=lifespan,
                  description="3D medical image segmentation: upload a volume, poll the job, download the mask.")
    app.state.tessera = state
    install_problem_handlers(app)
    app.include_router(router)
    app.include_router(page_router)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(RequestBodyLimits, limit=settings.max_upload_bytes,
                       idle_timeout_s=settings.body_idle_timeout_s, min_rate=settings.min_upload_rate)
    app.add_middleware(HeadAsGet)

    @app.get("/healthz", response_model=schemas.Health, response_model_exclude_none=True,
             summary="The process answers")
    def healthz() -> schemas.Health:
        return schemas.Health(status="ok", version=tool_version())

    @app.get("/readyz", response_model=schemas.Health, summary="Database reachable and workers ready",
             responses=problem_responses(503))
    def readyz() -> Any:
        try:
            state.store.ping()
            queued = state.store.count_queued()
        except Exception:
            return problem_response(503, "NOT_READY", "the job database is not reachable", "/readyz")
        if not state.pool.ready():
            return problem_response(503, "NOT_READY", "workers are starting or restarting", "/readyz")
        return schemas.Health(status="ready", version=tool_version(), workers=state.pool.slots, queued=queued)

    return app

