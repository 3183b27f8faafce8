"""The service's Ray executor: a job worker whose case runs on a Ray actor instead of in its own process.

Everything that makes a job durable stays where the local pool keeps it: the worker process on the server claims
from SQLite, counts the attempt, records stage and progress, checks cancel, timeout and shutdown every half second
while the actor works, and writes the result folder (staged, renamed once) before it marks the job succeeded. What
moves to the cluster is :class:`~app.jobs.ray_cluster.CaseActor`: the case's files go to it as bytes and its
outputs come back as bytes (:mod:`app.jobs.ray_cluster`). The actor is owned by its worker, so it dies with it (and
with the server: ``kill -9`` leaves nothing running on the cluster). A job is stopped on the actor only by killing
the actor (a fresh one is started for the next job); an actor or node lost mid-job re-queues the job, counted as a
crash (``max_attempts``, then ``JOB_CRASHED``). Not enforced on the cluster: ``max_worker_memory_bytes`` (the
monitor samples only the processes on the server; the actor's node has its own memory monitor).
"""

from __future__ import annotations

import logging
import os
import threading
from types import ModuleType
from typing import TYPE_CHECKING, Any

from app.jobs.ray_cluster import (
    actor_slots,
    lost_worker_errors,
    pack_case,
    publish_outcome,
    ray_connection,
    start_actor,
    stop_actor,
)
from app.jobs.store import Job
from app.jobs.worker import _Worker, after_crash, job_dir
from pipelines.errors import Interrupted, TesseraError

if TYPE_CHECKING:
    from app.service.settings import ServiceSettings
    from pipelines.segment import RunSettings

log = logging.getLogger(__name__)

WAIT_S = 0.5  # how often a worker looks at cancel, timeout and shutdown while its actor works


class RayWorker(_Worker):
    """A job worker whose predict step runs on its own Ray actor; claiming and bookkeeping stay on the server."""

    def __init__(self, slot: int, settings: ServiceSettings, stop: threading.Event, parent: int) -> None:
        super().__init__(slot, settings, stop, parent)
        self.device = "ray"
        self.ray: ModuleType | None = None
        self.actor: Any = None
        self.actor_up: Any = None  # the actor's ready() answer, until it comes
        self.default_name = ""

    def serve(self) -> None:
        from models.registry import resolve_model

        threading.Thread(target=self.heartbeat_forever, name="heartbeat", daemon=True).start()
        self.default_name = resolve_model(self.settings.default_model).name
        with ray_connection(self.settings.ray_address) as ray:
            self.ray = ray
            try:
                while not self.stop.is_set():
                    if not self._actor_ready():
                        continue
                    job = self.store.claim_next(self.slot)  # only with an actor placed: no job waits for one
                    if job is None:
                        self.stop.wait(0.2)
                        continue
                    self.run(job)
            finally:
                self._drop_actor()

    def run(self, job: Job) -> None:
        """One claimed job: its files to the actor, the answer waited for under the job's checks, the result
        written here."""
        assert self.ray is not None
        ray, lost = self.ray, lost_worker_errors(self.ray)
        log.info("job %s: started (attempt %d) on worker %d (Ray)", job.id, job.attempts, self.slot)
        folder = job_dir(self.settings, job.id)
        progress = self._progress(job)
        try:
            progress("read", 0.0)
            packed = ray.put(pack_case(self._case_input(job, progress)))  # uploads, or a study fetched from a PACS
            answer = self.actor.segment.remote(packed, self._run_settings(job))
            del packed
            while not ray.wait([answer], timeout=WAIT_S)[0]:
                progress("predict", 0.0)  # raises Interrupted on cancel, timeout or shutdown
            outcome = ray.get(answer)
        except Interrupted as stop:
            self._drop_actor()  # the case stops on the cluster only with its actor
            self._interrupted(job, stop.reason)
            return
        except TesseraError as exc:  # a study by reference that could not be fetched
            self._finish(job, "failed", error_code=exc.code, error_message=exc.message)
            return
        except ray.exceptions.RayTaskError as exc:  # a bug in the actor's code: the job fails, coded
            log.error("job %s: internal error on the Ray actor (%s)", job.id, type(exc.cause).__name__)
            self._finish(job, "failed", error_code="INTERNAL_ERROR", error_message=type(exc.cause).__name__)
            return
        except lost as exc:
            log.error("job %s: its Ray actor was lost (%s); queued again", job.id, type(exc).__name__)
            self._drop_actor()
            current = self.store.get(job.id)
            after_crash(self.store, self.settings, current or job)
            return
        self._record(job, publish_outcome(outcome, folder / "output"))

    def _run_settings(self, job: Job) -> RunSettings:
        """The job's options as the actor's :class:`~pipelines.segment.RunSettings` (as the local worker builds
        its :class:`~pipelines.segment.CaseJob`)."""
        from pipelines.ingestion.reading import ReadOptions
        from pipelines.segment import OutputOptions, RunSettings

        options = job.options
        model = self.settings.default_model if job.model in ("", self.default_name) else job.model
        return RunSettings(model=model, device=self.settings.device, sampling=dict(options.get("sampling") or {}),
                           keep_largest=options.get("keep_largest", True),
                           read_options=ReadOptions(series=options.get("series"), tilt=options.get("tilt", "refuse")),
                           outputs=OutputOptions(formats=frozenset(options["formats"]) if options.get("formats")
                                                 else None, seg_type=options.get("seg_type", "binary")))

    def _actor_ready(self) -> bool:
        """This worker's actor is placed and has the default model loaded; starts one when there is none, and
        waits at most ``WAIT_S`` for it (a cluster without room for it leaves this worker idle, not its jobs)."""
        assert self.ray is not None
        ray = self.ray
        if self.actor is not None and self.actor_up is None:
            return True
        if self.actor is None:
            slots = actor_slots(ray)
            if not slots:
                self.stop.wait(1.0)
                return False
            self.actor = start_actor(ray, slots[self.slot % len(slots)])
            self.actor_up = self.actor.ready.remote()
        if not ray.wait([self.actor_up], timeout=WAIT_S)[0]:
            return False
        try:
            node = ray.get(self.actor_up)
            ray.get(self.actor.load.remote(self._default_settings()))
        except lost_worker_errors(ray):
            self._drop_actor()
            return False
        except ray.exceptions.RayTaskError as exc:
            log.error("worker %d: the default model does not load on the Ray actor: %s", self.slot, exc.cause)
        self.actor_up = None
        self.ready, self.device = True, f"ray:{node[:12]}"
        self.store.worker_beat(self.slot, os.getpid(), self.device, True)
        log.info("worker %d ready: Ray actor on node %s", self.slot, node)
        return True

    def _default_settings(self) -> RunSettings:
        from pipelines.segment import RunSettings

        return RunSettings(model=self.settings.default_model, device=self.settings.device)

    def _drop_actor(self) -> None:
        if self.actor is not None and self.ray is not None:
            stop_actor(self.ray, self.actor)
        self.actor = self.actor_up = None
        self.ready = False
