"""The results page: ``/`` and its assets (HTML, two ES modules, CSS, the NiiVue bundle), and the job's input
image for the viewer (``GET /v1/jobs/{id}/image``).

The page is static: it talks to the ``/v1`` API with ``fetch`` and the caller's key in the ``Authorization``
header. Every page response carries a Content-Security-Policy that allows scripts, styles and connections to
this origin only (NiiVue 0.69 starts no workers and needs no ``eval``). NiiVue comes from npm
(``app/service/web/package.json``, installed by ``make setup`` or the Docker build); without it ``/`` says how
to install it.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, Response
from starlette.concurrency import run_in_threadpool

from app.jobs.store import Job
from app.jobs.worker import job_dir, job_inputs, result_dir
from app.service.app import Owner, _own_job, _state
from app.service.problems import ProblemError, problem_responses
from app.service.settings import ServiceSettings

if TYPE_CHECKING:
    from pipelines.volume import Volume

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parent / "web"
NIIVUE_BUNDLE = WEB_DIR / "node_modules" / "@niivue" / "niivue" / "dist" / "index.js"
CONTENT_SECURITY_POLICY = "; ".join((
    "default-src 'none'", "script-src 'self'", "style-src 'self'", "img-src 'self' blob: data:",
    "connect-src 'self'", "worker-src 'none'", "font-src 'self'", "base-uri 'none'", "form-action 'none'",
    "frame-ancestors 'none'"))
PAGE_HEADERS = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}
# The page's own files, by the name they are served under (nothing else under web/ is reachable).
ASSETS = {"app.js": "text/javascript", "viewer.js": "text/javascript", "page.css": "text/css"}
IMAGE_NAME = "image.nii.gz"
_MISSING_VIEWER = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Tessera: viewer not installed</title></head>
<body><h1>The results page needs the NiiVue viewer</h1>
<p>It is installed from npm into <code>app/service/web/node_modules</code>, which is missing here.
Install it once (a network connection to the npm registry is needed only for this step):</p>
<pre>make setup</pre><p>or</p><pre>npm ci --prefix app/service/web</pre>
<p>then reload this page. The REST API under <code>/v1</code> works without it.</p></body></html>
"""

router = APIRouter()


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def results_page() -> Response:
    if not NIIVUE_BUNDLE.is_file():
        log.warning("the results page is unavailable: %s is missing (run `make setup`)", NIIVUE_BUNDLE)
        return HTMLResponse(_MISSING_VIEWER, status_code=503, headers=PAGE_HEADERS)
    return FileResponse(WEB_DIR / "index.html", media_type="text/html", headers=PAGE_HEADERS)


@router.get("/page/{name}", include_in_schema=False)
def page_asset(name: str) -> Response:
    if name == "niivue.js" and NIIVUE_BUNDLE.is_file():
        return FileResponse(NIIVUE_BUNDLE, media_type="text/javascript", headers=PAGE_HEADERS)
    if name not in ASSETS:
        raise ProblemError(404, "NOT_FOUND", f"no page asset {name[:64]!r}")
    return FileResponse(WEB_DIR / name, media_type=ASSETS[name], headers=PAGE_HEADERS)


@router.get("/v1/jobs/{job_id}/image", summary="The job's input image on the mask's grid, as NIfTI",
            response_class=FileResponse, responses={200: {"content": {"application/gzip": {}}},
                                                    **problem_responses(401, 404, 409, 410, 422)})
async def job_image(request: Request, job_id: str, owner: Owner,
                    channel: Annotated[int, Query(ge=0, le=15)] = 0) -> FileResponse:
    """What the viewer draws the mask over: the input volume as the pipeline read it (channel ``channel``,
    after series selection and resampling onto the reference grid), written once and kept with the job."""
    state = _state(request)
    job = _own_job(state, job_id, owner)
    if job.purged_at is not None:
        raise ProblemError(410, "JOB_EXPIRED", "this job's files were deleted by the retention policy")
    if job.state != "succeeded":
        raise ProblemError(409, "JOB_NOT_SUCCEEDED", f"the job is {job.state}; its image is served once it succeeded")
    path = await run_in_threadpool(input_image, state.settings, job, channel)
    name = IMAGE_NAME if channel == 0 else f"image_{channel}.nii.gz"
    return FileResponse(path, media_type="application/gzip",
                        headers={"Content-Disposition": f'attachment; filename="{name}"'})


def input_image(settings: ServiceSettings, job: Job, channel: int) -> Path:
    """The cached NIfTI of one input channel on the mask's grid, written on the first request."""
    folder = job_dir(settings, job.id) / "viewer"
    path = folder / f"image_{channel}.nii.gz"
    if path.is_file():
        return path
    if not result_dir(settings, job.id).is_dir():
        raise ProblemError(410, "JOB_EXPIRED", "this job's files are gone")
    from models.registry import resolve_model
    from pipelines.errors import TesseraError
    from pipelines.ingestion.reading import ReadOptions, read_case

    options = job.options
    try:
        manifest = resolve_model(job.model)
        if channel >= len(manifest.channels):
            raise ProblemError(422, "CHANNEL_NOT_FOUND", f"model '{manifest.name}' has {len(manifest.channels)} "
                                                         f"channel(s); channel {channel} does not exist")
        case = read_case(list(job_inputs(settings, job)), manifest.channels,
                         job.id, ReadOptions(series=options.get("series"), tilt=options.get("tilt", "refuse")))
    except TesseraError as exc:  # the job read these inputs before; now they are gone or the model changed
        raise ProblemError(410, exc.code, exc.message) from None
    try:
        folder.mkdir(exist_ok=True)
        _write_image(case.volume, channel, path)
    except FileNotFoundError:  # the job was deleted meanwhile
        raise ProblemError(410, "JOB_EXPIRED", "this job's files are gone") from None
    return path


def _write_image(volume: Volume, channel: int, path: Path) -> None:
    """One channel of ``volume`` with the mask's geometry (the mask writer's header), as an intensity image."""
    import nibabel as nib
    import numpy as np

    from pipelines.writers.nifti import mask_image

    array = volume.array[channel] if volume.array.ndim == 4 else volume.array
    image = mask_image(np.ascontiguousarray(array), volume)  # same qform/sform as mask.nii.gz
    image.header["intent_code"] = 0
    image.header["cal_min"] = image.header["cal_max"] = 0
    image.header["descrip"] = b"tessera input image"
    partial = path.with_name(f".{uuid.uuid4().hex}.partial.nii.gz")  # two requests at once: each its own copy
    nib.save(image, str(partial))
    partial.rename(path)
