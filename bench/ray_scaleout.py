"""Per-case wall time of a model on a folder of cases: the local backend against the Ray backend on a local
Ray cluster of ``--nodes`` nodes (``ray.cluster_utils.Cluster``: a head that runs no work, plus nodes of
``--cpus-per-node`` CPUs, as GPU nodes would be), and the capacity each gives: cases per hour and per CPU-hour.

Both on the folder's cases repeated ``--copies`` times (so that the steady state outweighs the start). Local: as
``tessera segment`` runs it (one predictor, ``segment_cases`` with its default lanes: two cases at once on the
CPU, each with half the torch threads of the whole machine): the batch's wall seconds and each case's own. Ray:
``segment_cases_on_ray``: the batch's wall seconds (connection, actors and model loading included), the start
alone (a first batch of one case per actor, timed apart and taken off: ``steady_wall_s``) and each case's seconds
on its actor (1 torch thread per 1-CPU node). Throughput: cases / wall seconds; per CPU-hour: divided by the CPUs
used. Each backend ``--repeats`` times, alternating; the fastest run of each is kept (all walls listed).

On a GPU node, ``--device cuda --nodes 1 --gpus-per-node N --cpus-per-node C`` (C: the node's CPUs) gives the
per-case seconds of its GPU actors and ``cases_per_gpu_hour`` (the Ray backend runs one case per GPU at a time,
with C / N CPUs for the stages that stay on the CPU: read, preprocess, the way back, postprocess, write).

    python bench/ray_scaleout.py [--cases sample_data/imagesTs] [--model NAME] [--nodes 2] [--cpus-per-node 1]
                                 [--gpus-per-node 0] [--copies 3] [--repeats 2] [--device cpu]
                                 [--output bench/results/ray_scaleout_cpu-2core.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import emit  # noqa: E402

from pipelines.cases import CaseInput, discover_cases  # noqa: E402
from pipelines.segment import CaseResult, RunSettings  # noqa: E402

STORE_BYTES = 200 * 2**20


def copied_cases(folder: Path, copies: int, into: Path) -> list[CaseInput]:
    """The folder's cases ``copies`` times over, under distinct names (``<case>_c<k>``)."""
    into.mkdir(parents=True)
    for case in discover_cases([folder]):
        for k in range(copies):
            shutil.copy(case.path, into / f"{case.case_id}_c{k}.nii.gz")
    return discover_cases([into])


def local_run(cases: list[CaseInput], settings: RunSettings, scratch: Path) -> dict[str, Any]:
    """The local backend as ``tessera segment`` runs it: one predictor, the batch in its default lanes."""
    import torch

    from pipelines.segment import default_lanes, segment_cases

    began = time.perf_counter()
    predictor = settings.predictor()
    job = settings.case_job(scratch, predictor, overwrite=True)
    lanes = default_lanes(predictor.device, len(cases))
    results = list(segment_cases(cases, job, lanes=lanes))
    wall_s = time.perf_counter() - began
    failed = [(r.case_id, r.error_code) for r in results if r.status != "succeeded"]
    assert not failed, failed
    threads = torch.get_num_threads()
    rate = len(results) / wall_s * 3600
    return {"threads": threads, "lanes": lanes, "batch_cases": len(results), "batch_wall_s": round(wall_s, 2),
            **_case_seconds(results), "cases_per_hour": round(rate, 1),
            "cases_per_cpu_hour": round(rate / threads, 1)}


def _case_seconds(results: list[CaseResult]) -> dict[str, Any]:
    """Each case's seconds, their median and mean, and the mean seconds of each stage (from the reports)."""
    seconds = sorted(r.seconds for r in results)
    stages: dict[str, float] = {}
    for result in results:
        timings = json.loads((result.output_dir / "report.json").read_text())["timings_s"]
        for stage, value in timings.items():
            stages[stage] = stages.get(stage, 0.0) + value / len(results)
    return {"median_case_s": seconds[len(seconds) // 2], "mean_case_s": round(sum(seconds) / len(seconds), 3),
            "mean_stage_s": {stage: round(value, 3) for stage, value in stages.items()},
            "case_s": {r.case_id: r.seconds for r in results}}


def ray_run(cases: list[CaseInput], settings: RunSettings, nodes: int, cpus: int, gpus: int,
            scratch: Path) -> dict[str, Any]:
    from ray.cluster_utils import Cluster

    from app.jobs.ray_batch import segment_cases_on_ray

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    began = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                           "object_store_memory": STORE_BYTES})
    for _ in range(nodes):
        cluster.add_node(num_cpus=cpus, num_gpus=gpus, object_store_memory=STORE_BYTES)
    cluster.wait_for_nodes()
    cluster_s = time.perf_counter() - began
    try:
        began = time.perf_counter()  # the start: connection, actors, model loading, one case per actor
        first = list(segment_cases_on_ray(cases[:nodes], scratch / "start", settings, address=cluster.address))
        start_s = time.perf_counter() - began
        began = time.perf_counter()
        results = list(segment_cases_on_ray(cases, scratch / "run", settings, address=cluster.address))
        wall_s = time.perf_counter() - began
    finally:
        cluster.shutdown()
    failed = [(r.case_id, r.error_code) for r in first + results if r.status != "succeeded"]
    assert not failed, failed
    steady_s = max(wall_s - (start_s - max(r.seconds for r in first)), 1e-6)  # less the start (not its case)
    rate = len(results) / steady_s * 3600
    return {"nodes": nodes, "cpus_per_node": cpus, "gpus_per_node": gpus, "cluster_start_s": round(cluster_s, 2),
            "start_s": round(start_s, 2), "batch_cases": len(results), "batch_wall_s": round(wall_s, 2),
            "steady_wall_s": round(steady_s, 2), **_case_seconds(results), "cases_per_hour": round(rate, 1),
            "cases_per_cpu_hour": round(rate / (nodes * cpus), 1),
            **({"cases_per_gpu_hour": round(rate / (nodes * gpus), 1)} if gpus else {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=str(ROOT / "sample_data" / "imagesTs"))
    parser.add_argument("--model", default=None, help="default: the shipped default model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--cpus-per-node", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=0,
                        help="GPUs each local node declares (a GPU node: --device cuda --nodes 1 --gpus-per-node N)")
    parser.add_argument("--copies", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each backend; the fastest is kept")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()

    from models.registry import resolve_model

    manifest = resolve_model(args.model)
    settings = RunSettings(model=args.model, device=args.device)  # the CLI's default outputs: nifti, stats, preview
    with tempfile.TemporaryDirectory(prefix="tessera-bench-ray-") as scratch:
        cases = copied_cases(Path(args.cases), args.copies, Path(scratch) / "cases")
        load_before = os.getloadavg()
        locals_, rays = [], []
        for run in range(args.repeats):  # alternated, so that a busy minute of the machine hits both
            locals_.append(local_run(cases, settings, Path(scratch) / f"local{run}"))
            rays.append(ray_run(cases, settings, args.nodes, args.cpus_per_node, args.gpus_per_node,
                                Path(scratch) / f"ray{run}"))
        local = min(locals_, key=lambda r: r["batch_wall_s"])
        ray = min(rays, key=lambda r: r["steady_wall_s"])
        local["all_batch_wall_s"] = [r["batch_wall_s"] for r in locals_]
        ray["all_steady_wall_s"] = [r["steady_wall_s"] for r in rays]
    emit({
        "benchmark": "ray_scaleout",
        "model": f"{manifest.name} {manifest.version} ({manifest.family})",
        "cases": args.cases, "device": args.device,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_average_before": load_before,
                    "load_average_after": os.getloadavg(),
                    "note": "a shared machine: the load averages say how busy it was around the run"},
        "local": local,
        "ray": ray,
        "ray_vs_local_throughput": round(ray["cases_per_hour"] / local["cases_per_hour"], 3),
    }, args.output)


if __name__ == "__main__":
    main()
