"""Job workers: processes that keep models loaded and run queued jobs through :func:`segment_case`.

One process per slot (by default one per GPU, else one). A worker claims the oldest queued job in the
SQLite store, runs it with a progress callback that records stage and progress, and stops the job at the
next window when it is cancelled, times out or the server shuts down. The server's monitor thread
restarts a worker that died (its job re-runs, up to ``max_attempts``) and kills one that ignores a
timeout or a cancel, or whose job holds more memory than ``max_worker_memory_bytes`` (the job fails).
Workers die with the server (``PR_SET_PDEATHSIG``), so after a ``kill -9`` nothing runs on; the next start
re-queues what was running. With ``executor = "ray"`` the same workers claim and record jobs on the server, and
only the case itself runs on a Ray actor (:mod:`app.jobs.ray_executor`).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.jobs.store import Job, JobStore
from pipelines.errors import Interrupted, TesseraError
from pipelines.processes import die_with_parent, physical_memory_bytes, tree_resident_bytes

if TYPE_CHECKING:
    from app.service.settings import PacsEndpoint, ServiceSettings
    from pipelines.cases import CaseInput
    from pipelines.inference import Predictor
    from pipelines.ingestion.dicomweb import DicomWebServer
    from pipelines.segment import CaseJob, CaseResult, CaseRun

log = logging.getLogger(__name__)

# Where each pipeline stage sits on the job's 0..1 progress scale.
STAGE_SPANS: dict[str, tuple[float, float]] = {
    "starting": (0.0, 0.0), "loading_model": (0.0, 0.02), "fetch": (0.02, 0.02), "read": (0.02, 0.1),
    "preprocess": (0.1, 0.15), "predict": (0.15, 0.85), "to_source_grid": (0.85, 0.9), "postprocess": (0.9, 0.92),
    "write": (0.92, 1.0), "push": (1.0, 1.0),
}
PROGRESS_EVERY_S = 0.5
HEARTBEAT_EVERY_S = 2.0
MAX_LOADED_MODELS = 2


def job_dir(settings: ServiceSettings, job_id: str) -> Path:
    return settings.jobs_dir / job_id


def result_dir(settings: ServiceSettings, job_id: str) -> Path:
    """The case folder :func:`segment_case` writes (the case is named after the job: no file names)."""
    return job_dir(settings, job_id) / "output" / job_id


def dicomweb_cache(settings: ServiceSettings) -> Path:
    """Where jobs by reference find their studies: ``<study UID>/<series UID>/<SOP Instance UID>.dcm``."""
    return settings.data_dir / "dicomweb-cache"


def job_inputs(settings: ServiceSettings, job: Job) -> tuple[Path, ...]:
    """Where a job's input lies: its uploaded files, or for a job by reference the study (or series) in the
    server's DICOMweb cache (once its worker has fetched it)."""
    reference = job.options.get("pacs")
    if reference:
        study = dicomweb_cache(settings) / reference["study"]
        return (study / reference["series"] if reference.get("series") else study,)
    return tuple(job_dir(settings, job.id) / "input" / name for name in job.inputs)


def remove_job_files(settings: ServiceSettings, job_id: str) -> None:
    shutil.rmtree(job_dir(settings, job_id), ignore_errors=True)


def prune_dicomweb_cache(settings: ServiceSettings, store: JobStore) -> int:
    """Delete the cached studies that no job whose files are kept was made from; how many went. The folders are
    listed before the jobs are asked, so a study fetched for a job created meanwhile is not among them."""
    cache = dicomweb_cache(settings)
    studies = [folder for folder in cache.iterdir() if folder.is_dir()] if cache.is_dir() else []
    if not studies:
        return 0
    in_use = store.studies_in_use()
    unused = [folder for folder in studies if folder.name not in in_use]
    for folder in unused:
        shutil.rmtree(folder, ignore_errors=True)
    return len(unused)


def slot_device(settings: ServiceSettings, slot: int) -> str:
    if settings.device != "auto":
        return settings.device
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return f"cuda:{slot % count}" if count else "cpu"


def default_concurrency(settings: ServiceSettings) -> int:
    if settings.concurrency:
        return settings.concurrency
    if settings.executor == "ray":  # one worker per actor slot of the cluster: its GPUs, else its CPU nodes
        from app.jobs.ray_cluster import actor_slots, ray_connection

        with ray_connection(settings.ray_address) as ray:
            return max(len(actor_slots(ray)), 1)
    if settings.device.startswith("cuda") or settings.device == "cpu":
        return 1
    import torch

    return max(torch.cuda.device_count(), 1) if torch.cuda.is_available() else 1


# --- the worker process -----------------------------------------------------------------------


@dataclass
class _Reading:
    """A claimed job whose read stage runs (or ran) on the worker's reading thread."""

    job: Job
    case_job: CaseJob
    future: Future[CaseRun | CaseResult]
    ahead: bool = False  # claimed while another job was predicted: its attempt is counted when it is predicted


class _Worker:
    def __init__(self, slot: int, settings: ServiceSettings, stop: threading.Event, parent: int) -> None:
        self.slot, self.settings, self.stop, self.parent = slot, settings, stop, parent
        self.store = JobStore(settings.database)
        self.device = slot_device(settings, slot)
        self.predictors: OrderedDict[str, Predictor] = OrderedDict()
        self.ready = False

    def heartbeat_forever(self) -> None:
        while True:
            if os.getppid() != self.parent:
                os._exit(0)
            try:
                self.store.worker_beat(self.slot, os.getpid(), self.device, self.ready)
            except Exception:  # the database may be briefly locked; the next beat will do
                log.debug("heartbeat failed", exc_info=True)
            time.sleep(HEARTBEAT_EVERY_S)

    def predictor(self, model: str) -> Predictor:
        from models.registry import resolve_model
        from pipelines.inference import Predictor

        default = resolve_model(self.settings.default_model)  # may be a manifest path, not a registered name
        manifest = default if model in ("", default.name) else resolve_model(model)
        if manifest.name in self.predictors:
            self.predictors.move_to_end(manifest.name)
            return self.predictors[manifest.name]
        predictor = Predictor(manifest, device=self.device)
        self.predictors[manifest.name] = predictor
        while len(self.predictors) > MAX_LOADED_MODELS:
            self.predictors.popitem(last=False)
        return predictor

    def serve(self) -> None:
        threading.Thread(target=self.heartbeat_forever, name="heartbeat", daemon=True).start()
        try:
            self.predictor(self.settings.default_model or "")  # "" is the shipped default
        except TesseraError as exc:
            log.error("worker %d: the default model does not load: %s", self.slot, exc)
        self.ready = True
        self.store.worker_beat(self.slot, os.getpid(), self.device, True)
        log.info("worker %d ready on %s", self.slot, self.device)
        with ThreadPoolExecutor(1, thread_name_prefix="tessera-read-ahead") as reader:
            ahead: _Reading | None = None
            while not self.stop.is_set():
                current = ahead or self._start(self.store.claim_next(self.slot), reader)
                ahead = None
                if current is None:
                    self.stop.wait(0.2)
                    continue
                run = self._read_result(current)
                if run is None:
                    continue
                if self.settings.read_ahead and not self.stop.is_set():
                    # the next job is read (and prepared) while this one is predicted: one ahead at most
                    ahead = self._start(self.store.claim_next(self.slot, count_attempt=False), reader, ahead=True)
                self._complete(current, run)
            if ahead is not None and self._read_result(ahead) is not None:
                self._interrupted(ahead.job, "shutdown")  # read ahead, not run: it runs after the restart

    def run(self, job: Job) -> None:
        """One claimed job, its stages one after the other (no read-ahead)."""
        with ThreadPoolExecutor(1, thread_name_prefix="tessera-read") as reader:
            reading = self._start(job, reader)
            if reading is not None and (run := self._read_result(reading)) is not None:
                self._complete(reading, run)

    def _start(self, job: Job | None, reader: ThreadPoolExecutor, ahead: bool = False) -> _Reading | None:
        """The job's model (loaded here, not on the reading thread), and its read stage begun on ``reader``."""
        from pipelines.ingestion.reading import ReadOptions
        from pipelines.segment import CaseJob, OutputOptions

        if job is None:
            return None
        log.info("job %s: started (attempt %d) on worker %d%s", job.id, job.attempts + int(ahead), self.slot,
                 " (read ahead)" if ahead else "")
        folder = job_dir(self.settings, job.id)
        options = job.options
        progress = self._progress(job)
        try:
            progress("loading_model", 0.0)
            predictor = self.predictor(job.model).with_sampling(options.get("sampling"))
        except Interrupted as stop:
            self._interrupted(job, stop.reason)
            return None
        except TesseraError as exc:
            self._finish(job, "failed", error_code=exc.code, error_message=exc.message)
            return None
        outputs = OutputOptions(formats=frozenset(options["formats"]) if options.get("formats") else None,
                                seg_type=options.get("seg_type", "binary"))
        case_job = CaseJob(folder / "output", predictor, keep_largest=options.get("keep_largest", True),
                           overwrite=True, progress=progress, outputs=outputs,
                           read_options=ReadOptions(series=options.get("series"), tilt=options.get("tilt", "refuse")))
        return _Reading(job, case_job, reader.submit(lambda: case_job.read(self._case_input(job, progress))), ahead)

    def _case_input(self, job: Job, progress: Callable[[str, float], None]) -> CaseInput:
        """The job's case: its uploaded files, or for a job by reference the study fetched from its PACS into the
        server's DICOMweb cache (``PACS_*`` codes when that fails)."""
        from pipelines.cases import CaseInput

        reference = job.options.get("pacs")
        if reference:
            from pipelines.ingestion.dicomweb import DicomWebReference

            progress("fetch", 0.0)
            server, endpoint = self._pacs(reference["name"])
            server.fetch(DicomWebReference(endpoint.url.rstrip("/"), reference["study"], reference["series"]),
                         dicomweb_cache(self.settings))
        return CaseInput(job.id, job_inputs(self.settings, job))

    def _pacs(self, name: str) -> tuple[DicomWebServer, PacsEndpoint]:
        from pipelines.ingestion.dicomweb import Credentials, DicomWebServer, PacsError, Transport

        endpoint = self.settings.pacs.get(name)
        if endpoint is None:  # the settings changed since the job was accepted
            raise PacsError("PACS_UNKNOWN", f"no PACS named {name!r} in this server's settings")
        server = DicomWebServer(endpoint.url.rstrip("/"), Credentials(endpoint.user, endpoint.password,
                                                                      endpoint.token),
                                Transport(endpoint.timeout_s, endpoint.retries))
        return server, endpoint

    def _read_result(self, reading: _Reading) -> CaseRun | None:
        """The job's read stage, waited for; ``None`` when it ended the job (interrupted, or a bug)."""
        try:
            run = reading.future.result()
        except Interrupted as stop:
            self._interrupted(reading.job, stop.reason)
            return None
        except TesseraError as exc:  # a study by reference that could not be fetched
            self._finish(reading.job, "failed", error_code=exc.code, error_message=exc.message)
            return None
        except Exception as exc:  # a bug: the job fails with a code, the worker lives on
            log.error("job %s: internal error while reading (%s)", reading.job.id, type(exc).__name__, exc_info=exc)
            self._finish(reading.job, "failed", error_code="INTERNAL_ERROR", error_message=type(exc).__name__)
            return None
        from pipelines.segment import CaseResult

        assert not isinstance(run, CaseResult)  # overwrite=True: a job is never skipped as finished
        return run

    def _complete(self, reading: _Reading, run: CaseRun) -> None:
        """Predict, back to the source grid, write; the job's outcome recorded."""
        job = reading.job
        if reading.ahead:
            self.store.count_attempt(job.id)
        try:
            reading.case_job.compute(run)
            result = reading.case_job.write(run)
        except Interrupted as stop:
            self._interrupted(job, stop.reason)
            return
        except Exception as exc:  # a bug: the job fails with a code, the worker lives on
            log.error("job %s: internal error (%s)", job.id, type(exc).__name__, exc_info=exc)
            self._finish(job, "failed", error_code="INTERNAL_ERROR", error_message=type(exc).__name__)
            return
        self._record(job, result)

    def _record(self, job: Job, result: CaseResult) -> None:
        """The job's outcome from its case's result and report."""
        report = _read_report(result.output_dir)
        details: dict[str, Any] = {"warnings": report.get("warnings", []), "timings": report.get("timings_s", {})}
        if result.status == "failed":
            self._finish(job, "failed", error_code=result.error_code, error_message=result.error_message, **details)
            return
        artifacts = sorted(p.name for p in result.output_dir.iterdir() if p.is_file())
        reference = job.options.get("pacs")
        if reference and reference.get("push"):
            try:
                self._push(job, result.output_dir)
            except TesseraError as exc:  # the results stay downloadable; the job says what the PACS did
                self._finish(job, "failed", error_code=exc.code, error_message=exc.message, artifacts=artifacts,
                             **details)
                return
        self._finish(job, "succeeded", artifacts=artifacts, **details)

    def _push(self, job: Job, case_dir: Path) -> None:
        """The job's DICOM-SEG (and RTSTRUCT) stored back on the PACS it came from, and listed there."""
        from pipelines.ingestion.dicomweb import PacsError
        from pipelines.pacs import pushable

        objects = pushable(case_dir)
        if not objects:
            raise PacsError("PACS_REJECTED", "nothing to push: the job wrote no DICOM-SEG or RTSTRUCT")
        self.store.report_progress(job.id, "push", 1.0)  # the case is written: a cancel now changes nothing
        server, _ = self._pacs(job.options["pacs"]["name"])
        server.store(objects)
        log.info("job %s: pushed %s to PACS %s", job.id, ", ".join(p.name for p in objects),
                 job.options["pacs"]["name"])

    def _progress(self, job: Job) -> Callable[[str, float], None]:
        """The job's progress callback: records stage and progress, and stops the job (``Interrupted``) when the
        worker shuts down, the job's time is up or it is cancelled."""
        deadline = time.monotonic() + self.settings.job_timeout_s
        last: dict[str, Any] = {"stage": "", "time": 0.0}

        def progress(stage: str, fraction: float) -> None:
            now = time.monotonic()
            if self.stop.is_set():
                raise Interrupted("shutdown")
            if now > deadline:
                raise Interrupted("timeout")
            if stage == last["stage"] and now - last["time"] < PROGRESS_EVERY_S:
                return
            last.update(stage=stage, time=now)
            low, high = STAGE_SPANS.get(stage, (0.0, 0.0))
            if self.store.report_progress(job.id, stage, low + (high - low) * min(max(fraction, 0.0), 1.0)):
                raise Interrupted("cancelled")

        return progress

    def _interrupted(self, job: Job, reason: str) -> None:
        if reason == "shutdown":
            log.info("job %s: interrupted by shutdown; queued again", job.id)
            self.store.requeue(job.id, count_attempt=False)
        elif reason == "timeout":
            self._finish(job, "failed", error_code="JOB_TIMEOUT",
                         error_message=f"stopped after {self.settings.job_timeout_s:g} s (job_timeout_s)")
        else:
            self._finish(job, "cancelled")

    def _finish(self, job: Job, state: str, **details: Any) -> None:
        self.store.finish(job.id, state, **details)
        log.info("job %s: %s%s", job.id, state, f" ({details['error_code']})" if details.get("error_code") else "")
        current = self.store.get(job.id)
        if current is not None and current.delete_requested:
            remove_job_files(self.settings, job.id)
            self.store.delete(job.id)
        elif state != "succeeded":
            shutil.rmtree(job_dir(self.settings, job.id) / "output", ignore_errors=True)


def _read_report(case_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((case_dir / "report.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def worker_main(slot: int, settings_data: dict[str, Any], parent: int) -> None:
    """Entry point of a worker process; SIGTERM asks it to stop (a running job is re-queued)."""
    die_with_parent(parent)
    stop = threading.Event()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the server decides
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    from app.service.logs import configure_service_logging
    from app.service.settings import ServiceSettings

    configure_service_logging(f"worker-{slot}")
    settings = ServiceSettings(**settings_data)
    settings.apply_input_limits()
    if settings.executor == "ray":
        from app.jobs.ray_executor import RayWorker

        RayWorker(slot, settings, stop, parent).serve()
    else:
        _Worker(slot, settings, stop, parent).serve()


# --- the server side ----------------------------------------------------------------------------


class WorkerPool:
    """Starts the workers, watches them, enforces timeouts and cancels, sweeps old jobs."""

    def __init__(self, settings: ServiceSettings, store: JobStore) -> None:
        self.settings, self.store = settings, store
        self.context = multiprocessing.get_context("spawn")
        self.slots = default_concurrency(settings)
        self.memory_limit = settings.max_worker_memory_bytes or int(0.8 * physical_memory_bytes() / self.slots)
        self.processes: dict[int, BaseProcess] = {}
        self._cancel_seen: dict[str, float] = {}
        self._stopping = threading.Event()
        self._monitor: threading.Thread | None = None
        self._last_sweep = 0.0

    def start(self) -> None:
        for slot in range(self.slots):
            self._spawn(slot)
        self._monitor = threading.Thread(target=self._watch, name="job-monitor", daemon=True)
        self._monitor.start()

    def _spawn(self, slot: int) -> None:
        data = self.settings.model_dump(mode="json")
        process = self.context.Process(target=worker_main, args=(slot, data, os.getpid()),
                                       name=f"tessera-worker-{slot}", daemon=False)  # the DICOM reader forks
        process.start()
        self.processes[slot] = process

    def ready(self) -> bool:
        beats = {w["slot"]: w for w in self.store.workers()}
        now = time.time()
        return all(p.is_alive() for p in self.processes.values()) and all(
            slot in beats and beats[slot]["ready"] and now - beats[slot]["heartbeat"] < 4 * HEARTBEAT_EVERY_S
            for slot in self.processes)

    def stop(self, timeout: float = 15.0) -> None:
        self._stopping.set()
        for process in self.processes.values():
            if process.is_alive():
                process.terminate()  # SIGTERM: the job stops at its next window and is queued again
        end = time.monotonic() + timeout
        for process in self.processes.values():
            process.join(max(end - time.monotonic(), 0.1))
        for slot in self.processes:
            self._kill(slot)
            for job in self._running_on(slot):
                self.store.requeue(job.id, count_attempt=False)
        if self._monitor is not None:
            self._monitor.join(timeout=5)

    def _running_on(self, slot: int) -> list[Job]:
        return [job for job in self.store.jobs_in("running") if job.worker == slot]

    def _kill(self, slot: int) -> None:
        process = self.processes[slot]
        if process.is_alive():
            process.kill()
        process.join()

    def _restart(self, slot: int) -> None:
        self._kill(slot)
        if not self._stopping.is_set():
            self._spawn(slot)

    def _watch(self) -> None:
        while not self._stopping.wait(0.5):
            try:
                self._check_workers()
                self._sweep_deleted()
                if time.monotonic() - self._last_sweep > self.settings.retention_sweep_s:
                    self._last_sweep = time.monotonic()
                    self.sweep_expired()
            except Exception:  # the monitor must outlive any one problem
                log.exception("job monitor")

    def _check_workers(self) -> None:
        if self._stopping.is_set():
            return
        now = time.time()
        running: dict[int, list[Job]] = {}
        for job in self.store.jobs_in("running"):  # a worker that reads ahead runs two: one predicted, one read
            if job.worker is not None:
                running.setdefault(job.worker, []).append(job)
        for slot, process in list(self.processes.items()):
            jobs = sorted(running.get(slot, []), key=lambda j: j.started_at or 0.0)
            if not process.is_alive():
                log.error("worker %d died (exit code %s)", slot, process.exitcode)
                for job in jobs:
                    self._after_crash(job)
                self._restart(slot)
                continue
            if not jobs:
                continue
            used = tree_resident_bytes(process.pid) if process.pid else 0
            if used > self.memory_limit:
                log.error("job %s: worker %d used %.2f GiB (limit %.2f GiB); killed", jobs[0].id, slot,
                          used / 2**30, self.memory_limit / 2**30)
                self._restart_after(slot, jobs, jobs[0], "failed", "JOB_MEMORY_EXCEEDED",
                                    f"the job needed more than {self.memory_limit / 2**30:.2f} GiB of memory "
                                    "(max_worker_memory_bytes)")
                continue
            for job in jobs:
                if job.started_at and now - job.started_at > self.settings.job_timeout_s + self.settings.cancel_grace_s:
                    log.error("job %s: worker %d ignored the timeout; killed", job.id, slot)
                    self._restart_after(slot, jobs, job, "failed", "JOB_TIMEOUT",
                                        f"stopped after {self.settings.job_timeout_s:g} s (job_timeout_s)")
                    break
                if job.cancel_requested:
                    seen = self._cancel_seen.setdefault(job.id, time.monotonic())
                    if time.monotonic() - seen > self.settings.cancel_grace_s:
                        log.warning("job %s: worker %d ignored the cancel; killed", job.id, slot)
                        self._restart_after(slot, jobs, job, "cancelled", None, None)
                        break

    def _restart_after(self, slot: int, jobs: list[Job], job: Job, state: str, code: str | None,
                       message: str | None) -> None:
        """Kill the worker for ``job`` (which ends as ``state``); the other job it held (read ahead) runs again."""
        self._kill(slot)  # first: a killed worker cannot write over the outcome
        self.store.finish(job.id, state, error_code=code, error_message=message)
        for index, other in enumerate(jobs):  # oldest first: the one predicted, whose attempt was counted
            if other.id != job.id and other.cancel_requested:
                self.store.finish(other.id, "cancelled")
            elif other.id != job.id:
                self.store.requeue(other.id, count_attempt=index > 0)  # not held against it (ahead: never counted)
        self._restart(slot)

    def _after_crash(self, job: Job) -> None:
        after_crash(self.store, self.settings, job)

    def _sweep_deleted(self) -> None:
        for job_id in self.store.deleted_ids():
            remove_job_files(self.settings, job_id)
            self.store.delete(job_id)
            self._cancel_seen.pop(job_id, None)

    def sweep_expired(self) -> int:
        """Delete the files of jobs finished longer ago than the retention period; their records stay."""
        expired = self.store.expired(time.time() - self.settings.retention_hours * 3600)
        for job_id in expired:
            remove_job_files(self.settings, job_id)
            self.store.mark_purged(job_id)
        if expired:
            log.info("retention: deleted the files of %d job(s)", len(expired))
        pruned = prune_dicomweb_cache(self.settings, self.store)
        if pruned:
            log.info("retention: deleted %d cached DICOMweb study(ies) no kept job was made from", pruned)
        return len(expired)


def after_crash(store: JobStore, settings: ServiceSettings, job: Job) -> None:
    """A job whose worker (or Ray actor) died under it: queued again, unless it was cancelled or has crashed
    ``max_attempts`` times (``JOB_CRASHED``)."""
    if job.cancel_requested:
        store.finish(job.id, "cancelled")
    elif job.attempts >= settings.max_attempts:
        store.finish(job.id, "failed", error_code="JOB_CRASHED",
                     error_message=f"the worker died {job.attempts} times running this job")
    else:
        store.requeue(job.id)


def recover_data_dir(settings: ServiceSettings, store: JobStore) -> None:
    """At start-up: re-queue interrupted jobs, drop uploads that never became jobs."""
    recovery = store.recover(settings.max_attempts)
    if recovery.requeued:
        log.info("re-queued %d job(s) interrupted by the last shutdown", len(recovery.requeued))
    if recovery.failed:
        log.warning("%d job(s) failed after repeated crashes", len(recovery.failed))
    known = store.known_ids()
    settings.jobs_dir.mkdir(parents=True, exist_ok=True)
    for folder in settings.jobs_dir.iterdir():
        if folder.name not in known:
            shutil.rmtree(folder, ignore_errors=True)
