"""A batch of cases spread over Ray actors; the driver keeps the run's bookkeeping.

The driver (``tessera segment --backend ray``) skips finished cases exactly as the local run does, sends each
remaining case as bytes to an idle actor (:mod:`app.jobs.ray_cluster`) and writes what comes back into the output
folder, one atomic rename per case. An actor or node that dies mid-case loses nothing: its case goes back to the
front of the queue and runs again on another actor; its outputs are written once, by the driver, from the one
answer it gets. A case that has killed ``max_attempts`` actors fails alone with ``CASE_CRASHED``.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from app.jobs.ray_cluster import (
    actor_slots,
    lost_worker_errors,
    pack_case,
    publish_outcome,
    ray_connection,
    start_actor,
    stop_actor,
)
from pipelines.cases import CaseInput
from pipelines.segment import CaseResult, RunSettings, skipped_case

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3


@dataclass
class _Dispatch:
    """A case sent to an actor, waiting for its answer."""

    case: CaseInput
    actor: Any


def segment_cases_on_ray(
    cases: Sequence[CaseInput],
    output_root: Path,
    settings: RunSettings,
    *,
    overwrite: bool = False,
    address: str | None = None,
    max_attempts: int = MAX_ATTEMPTS,
) -> Iterator[CaseResult]:
    """Every case of a batch on the Ray cluster at ``address``; results as cases finish (skipped ones first)."""
    todo: deque[CaseInput] = deque()
    for case in cases:
        skipped = skipped_case(case, output_root, overwrite)
        if skipped is not None:
            yield skipped
        else:
            todo.append(case)
    if not todo:
        return
    with ray_connection(address) as ray:
        actors = _start_actors(ray, settings, len(todo))
        try:
            yield from _run_on(ray, actors, todo, output_root, settings, max_attempts)
        finally:
            for actor in actors:
                stop_actor(ray, actor)


def _start_actors(ray: ModuleType, settings: RunSettings, cases: int) -> list[Any]:
    """One actor per slot of the cluster (no more than there are cases), each with the model loaded."""
    slots = actor_slots(ray)[:cases]
    if not slots:
        from pipelines.errors import UsageError

        raise UsageError("RAY_NO_RESOURCES", "the Ray cluster has no node with a CPU or GPU to run cases on")
    actors = [start_actor(ray, slot) for slot in slots]
    ray.get([actor.load.remote(settings) for actor in actors])
    log.info("%d Ray actor(s) ready (%s)", len(actors),
             ", ".join(f"{s.num_gpus} GPU" if s.num_gpus else f"{s.num_cpus} CPU" for s in slots))
    return actors


def _run_on(ray: ModuleType, actors: list[Any], todo: deque[CaseInput], output_root: Path, settings: RunSettings,
            max_attempts: int) -> Iterator[CaseResult]:
    """The queue through the actors, one case in flight on each; results as they come back."""
    idle = list(actors)
    in_flight: dict[Any, _Dispatch] = {}  # object ref of the answer -> what was sent
    attempts: Counter[str] = Counter()
    lost = lost_worker_errors(ray)
    while todo or in_flight:
        while idle and todo:
            case, actor = todo.popleft(), idle.pop()
            attempts[case.case_id] += 1
            in_flight[actor.segment.remote(ray.put(pack_case(case)), settings)] = _Dispatch(case, actor)
        if not in_flight:  # every actor is gone: what is left fails, coded, rather than waiting forever
            yield from (_failed(case, "RAY_WORKERS_LOST", "every Ray actor of this run was lost") for case in todo)
            return
        (ref,), _ = ray.wait(list(in_flight), num_returns=1)
        sent = in_flight.pop(ref)
        try:
            outcome = ray.get(ref)
        except ray.exceptions.RayTaskError as exc:  # a bug in the actor's code, not a bad case: it fails alone
            idle.append(sent.actor)
            yield _failed(sent.case, "INTERNAL_ERROR", f"{type(exc.cause).__name__} on a Ray actor")
            continue
        except lost as exc:
            stop_actor(ray, sent.actor)
            actors.remove(sent.actor)
            yield from _after_lost_actor(sent.case, exc, attempts[sent.case.case_id], max_attempts, todo)
            continue
        idle.append(sent.actor)
        log.debug("case %s segmented on node %s", sent.case.case_id, outcome.node[:12])
        yield publish_outcome(outcome, output_root)


def _after_lost_actor(case: CaseInput, error: BaseException, attempts: int, max_attempts: int,
                      todo: deque[CaseInput]) -> Iterator[CaseResult]:
    """A case whose actor died: back to the front of the queue, or failed once it has cost ``max_attempts``."""
    if attempts >= max_attempts:
        yield _failed(case, "CASE_CRASHED", f"its Ray actor died {attempts} times running this case")
        return
    log.warning("case %s: its Ray actor was lost (%s); running it again on another", case.case_id,
                type(error).__name__)
    todo.appendleft(case)


def _failed(case: CaseInput, code: str, message: str) -> CaseResult:
    """A case that never reached an actor's answer: nothing of it is written."""
    return CaseResult(case.case_id, "failed", Path(), code, message)
