"""Ray as a place to run cases: the connection, one actor per GPU (or per CPU node), and cases as bytes.

Ray is an optional extra (``pip install tessera[ray]``); nothing here imports it at module load, and asking for it
without it installed is a coded usage error, ``BACKEND_UNAVAILABLE``.

What travels how: a case's input files are read by the driver (the CLI, or a service worker on the server) and
sent as bytes through Ray's object store with the call; the actor writes them into its own temporary folder, runs
:class:`~pipelines.segment.CaseJob` there and returns the case folder's files as bytes, which the driver writes into
a staging folder and renames into place (:func:`~pipelines.segment.publish_case`). Always the object store (Ray
spills it to local disk when it is full), never a shared path: the nodes need no shared filesystem. What each node
does need: Tessera and its model weights installed (the model is resolved by name or manifest path on the node).
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from pipelines.cases import CaseInput
from pipelines.errors import UsageError

if TYPE_CHECKING:
    from pipelines.inference import Predictor
    from pipelines.segment import CaseResult, RunSettings

log = logging.getLogger(__name__)

MAX_LOADED_MODELS = 2
MIN_RAY = "2.40"


def import_ray() -> ModuleType:
    """The ``ray`` module, or ``BACKEND_UNAVAILABLE`` (exit code 2) when the extra is not installed."""
    try:
        import ray
    except ImportError:
        raise UsageError("BACKEND_UNAVAILABLE", f"the Ray backend needs ray>={MIN_RAY}: pip install 'tessera[ray]' "
                                                "(or use the local backend)") from None
    return ray


@contextmanager
def ray_connection(address: str | None) -> Iterator[ModuleType]:
    """Connected to the cluster at ``address`` (``None``: ``$RAY_ADDRESS``, else a Ray started on this machine) for
    the block; a connection that already exists in this process is used as it is and left open."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no telemetry
    if address:
        check_reachable(address)
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise UsageError("RAY_UNREACHABLE", f"no Ray cluster at {address or 'the default address'}: "
                                            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """``RAY_UNREACHABLE`` when nothing listens at a ``HOST:PORT`` address (Ray itself would retry for minutes);
    other forms (``auto``, ``ray://...``) are left to Ray."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or "://" in address:
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise UsageError("RAY_UNREACHABLE", f"no Ray cluster at {address}: {exc.strerror or type(exc).__name__} "
                                            "(the head's address, as `ray start --head` printed it)") from None


# --- where actors go ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ActorSlot:
    """The resources one case actor takes: a GPU, or every CPU of one node (``node_id``: placed there)."""

    num_cpus: int
    num_gpus: int = 0
    node_id: str | None = None


def actor_slots(ray: ModuleType) -> list[ActorSlot]:
    """One slot per GPU of the cluster, each with its share of its node's CPUs (reading, resampling and writing
    run there); on a cluster without GPUs, one per alive node with CPUs, taking them all (the network's own threads
    use them: one case per node at a time)."""
    nodes = sorted((node for node in ray.nodes() if node.get("Alive")), key=lambda n: n["NodeID"])
    if any(node["Resources"].get("GPU", 0) >= 1 for node in nodes):
        return [ActorSlot(num_cpus=max(int(node["Resources"].get("CPU", 0)) // gpus, 1), num_gpus=1,
                          node_id=node["NodeID"])
                for node in nodes if (gpus := int(node["Resources"].get("GPU", 0))) for _ in range(gpus)]
    return [ActorSlot(num_cpus=int(node["Resources"]["CPU"]), node_id=node["NodeID"])
            for node in nodes if node["Resources"].get("CPU", 0) >= 1]


def start_actor(ray: ModuleType, slot: ActorSlot) -> Any:
    """A :class:`CaseActor` on ``slot`` (not restarted by Ray: the driver decides what runs again where)."""
    options: dict[str, Any] = {"num_cpus": slot.num_cpus, "num_gpus": slot.num_gpus, "max_restarts": 0}
    if slot.node_id is not None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(slot.node_id, soft=True)
    return ray.remote(CaseActor).options(**options).remote(slot.num_cpus)


def stop_actor(ray: ModuleType, actor: Any) -> None:
    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # already gone with its node
        log.debug("actor already gone", exc_info=True)


def lost_worker_errors(ray: ModuleType) -> tuple[type[BaseException], ...]:
    """Errors that mean the actor or its node is gone (the case did not fail: it runs again), as opposed to
    ``RayTaskError``, an exception raised by the code inside it."""
    exceptions = ray.exceptions
    names = ("RayActorError", "ActorUnavailableError", "ObjectLostError", "OwnerDiedError", "NodeDiedError",
             "WorkerCrashedError", "LocalRayletDiedError")
    return tuple(getattr(exceptions, name) for name in names if hasattr(exceptions, name))


# --- cases as bytes ----------------------------------------------------------------------------------


@dataclass
class CaseFiles:
    """A case's files as bytes, keyed by their path relative to a folder (``0/ct.nii.gz``, ``1/study/IM1``)."""

    case_id: str
    files: dict[str, bytes] = field(default_factory=dict)
    roots: tuple[str, ...] = ()  # one per input path of the case, relative to the folder

    @property
    def size(self) -> int:
        return sum(len(data) for data in self.files.values())


def pack_case(case: CaseInput) -> CaseFiles:
    """Every file of ``case`` (a file, or a DICOM folder searched recursively) read into memory."""
    packed = CaseFiles(case.case_id)
    roots = []
    for index, path in enumerate(case.paths):
        root = f"{index}/{path.name}"
        roots.append(root)
        if path.is_dir():
            for member in sorted(p for p in path.rglob("*") if p.is_file()):
                packed.files[f"{root}/{member.relative_to(path).as_posix()}"] = member.read_bytes()
        else:
            packed.files[root] = path.read_bytes()
    packed.roots = tuple(roots)
    return packed


def unpack_case(packed: CaseFiles, folder: Path) -> CaseInput:
    """``packed`` written under ``folder``; the case as it now lies there."""
    for name, data in packed.files.items():
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return CaseInput(packed.case_id, tuple(folder / root for root in packed.roots))


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@dataclass
class CaseOutcome:
    """What an actor sends back for one case: its result and its case folder's files."""

    result: CaseResult
    files: dict[str, bytes]
    node: str = ""


def publish_outcome(outcome: CaseOutcome, output_root: Path) -> CaseResult:
    """The outcome's files into a staging folder, renamed into place once: the case's result, now on this
    machine."""
    from pipelines.segment import publish_case, staging_dir

    case_id = outcome.result.case_id
    staging = staging_dir(output_root, case_id)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name, data in outcome.files.items():
        target = staging / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return replace(outcome.result, output_dir=publish_case(staging, output_root / case_id))


# --- the actor -----------------------------------------------------------------------------------------


class CaseActor:
    """Keeps models loaded (the last two used) on its GPU or node and segments cases sent to it as bytes."""

    def __init__(self, threads: int) -> None:
        import torch

        torch.set_num_threads(max(threads, 1))
        self.predictors: OrderedDict[tuple[str | None, str, bool], Predictor] = OrderedDict()

    def ready(self) -> str:
        """This actor's node (answered once its process is up)."""
        import ray

        return str(ray.get_runtime_context().get_node_id())

    def load(self, settings: RunSettings) -> None:
        """Load the run's model now (a batch does it before its first case)."""
        self._predictor(settings)

    def segment(self, packed: CaseFiles, settings: RunSettings) -> CaseOutcome:
        """One case through :class:`~pipelines.segment.CaseJob` in a temporary folder; never raises for a bad
        case (its result says failed, with the code)."""
        with tempfile.TemporaryDirectory(prefix="tessera-ray-") as scratch:
            folder = Path(scratch)
            case = unpack_case(packed, folder / "input")
            job = settings.case_job(folder / "output", self._predictor(settings), overwrite=True)
            result = job.run(case)
            return CaseOutcome(result, folder_files(result.output_dir), self.ready())

    def _predictor(self, settings: RunSettings) -> Predictor:
        key = (settings.model, settings.device, settings.amp)
        if key in self.predictors:
            self.predictors.move_to_end(key)
        else:
            self.predictors[key] = settings.predictor()
            while len(self.predictors) > MAX_LOADED_MODELS:
                self.predictors.popitem(last=False)
        return self.predictors[key]
