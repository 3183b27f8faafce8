"""A batch with reading and writing overlapped with prediction, or with cases predicted side by side in lanes,
gives what the one-at-a-time loop gives."""

from __future__ import annotations

import json
import shutil
import threading
import time

import nibabel as nib
import numpy as np
import torch

from models.manifest import load_manifest
from pipelines.cases import discover_cases
from pipelines.inference import Predictor
from pipelines.segment import CaseJob, segment_cases


def _folder(tmp_path, small_phantom_files):
    folder = tmp_path / "cases"
    folder.mkdir()
    for name in ("case3", "case4"):
        shutil.copy(small_phantom_files[name], folder / f"{name}.nii.gz")
    shutil.copy(small_phantom_files["case3"], folder / "again.nii.gz")
    good = small_phantom_files["case3"].read_bytes()
    (folder / "broken.nii.gz").write_bytes(good[: len(good) // 3])
    return folder


def test_overlapped_batch_and_lanes_equal_the_sequential_loop(tmp_path, small_phantom_files, tiny_model):
    folder = _folder(tmp_path, small_phantom_files)
    cases = discover_cases([str(folder)], channels=1)
    predictor = Predictor(load_manifest(tiny_model.manifest_path), device="cpu")
    threads = torch.get_num_threads()
    results = {}
    for mode, options in (("sequential", {"overlap": False}), ("overlapped", {}), ("lanes", {"lanes": 2})):
        results[mode] = list(segment_cases(cases, CaseJob(tmp_path / mode, predictor), **options))
    assert torch.get_num_threads() == threads  # the lanes' share of the threads is given back
    sequential = results["sequential"]
    for mode in ("overlapped", "lanes"):
        assert [(r.case_id, r.status, r.error_code) for r in results[mode]] == \
            [(r.case_id, r.status, r.error_code) for r in sequential]
        assert {r.case_id: r.status for r in results[mode]} == {"again": "succeeded", "broken": "failed",
                                                                "case3": "succeeded", "case4": "succeeded"}
        for result in results[mode]:
            report = json.loads((result.output_dir / "report.json").read_text())
            if result.status != "succeeded":
                assert report["error"]["code"] == "NIFTI_UNREADABLE"
                continue
            ours = np.asarray(nib.load(result.output_dir / "mask.nii.gz").dataobj)
            theirs = np.asarray(nib.load(tmp_path / "sequential" / result.case_id / "mask.nii.gz").dataobj)
            assert np.array_equal(ours, theirs)
            first = json.loads((tmp_path / "sequential" / result.case_id / "report.json").read_text())
            plan, alone = report["settings"]["stitch_plan"], first["settings"]["stitch_plan"]
            assert {k: v for k, v in plan.items() if k != "budget_bytes"} == \
                {k: v for k, v in alone.items() if k != "budget_bytes"}  # each case's own plan, not a neighbour's
            stages = report["timings_s"]
            assert {"read", "preprocess", "predict", "to_source_grid", "write", "total"} <= set(stages)
            assert stages["total"] >= max(v for k, v in stages.items() if k != "total")
        assert not list((tmp_path / mode).glob(".*.partial"))


def test_overlapped_batch_reads_ahead_and_writes_behind(tmp_path, small_phantom_files, tiny_model, monkeypatch):
    """The next case is read while one computes, and at most one case is read ahead of the one computing."""
    folder = _folder(tmp_path, small_phantom_files)
    cases = discover_cases([str(folder)], channels=1)
    job = CaseJob(tmp_path / "out", Predictor(load_manifest(tiny_model.manifest_path), device="cpu"))
    events: list[tuple[str, str, str]] = []
    lock = threading.Lock()

    def traced(stage, method):
        def call(arg):
            name = arg.case_id if stage == "read" else arg.case.case_id
            with lock:
                events.append(("start", stage, name))
            out = method(arg)
            with lock:
                events.append(("end", stage, name))
            return out
        return call

    for stage in ("read", "compute", "write"):
        monkeypatch.setattr(job, stage, traced(stage, getattr(job, stage)))
    statuses = [r.status for r in segment_cases(cases, job)]
    assert statuses.count("succeeded") == 3
    order = [c.case_id for c in cases]
    for index, name in enumerate(order[:-1]):  # read of the next case starts before this one's compute ends
        if name == "broken":  # (nothing to compute: its read failed)
            continue
        assert events.index(("start", "read", order[index + 1])) < events.index(("end", "compute", name))
    for index, name in enumerate(order):  # never two cases read ahead: case i+2's read waits for i's compute
        if index + 2 < len(order):
            assert events.index(("start", "read", order[index + 2])) > events.index(("start", "compute", name))


def test_lanes_run_two_cases_at_once_never_more(tmp_path, small_phantom_files, tiny_model, monkeypatch):
    """Two lanes: two cases in flight at once (each on its own thread, one torch thread each on two), never three;
    a caller that stops early starts no further case."""
    folder = _folder(tmp_path, small_phantom_files)
    cases = discover_cases([str(folder)], channels=1)
    job = CaseJob(tmp_path / "out", Predictor(load_manifest(tiny_model.manifest_path), device="cpu"))
    lock = threading.Lock()
    running: set[str] = set()
    most: list[int] = [0]
    started: list[str] = []
    lane_threads: list[int] = []
    run = job.run

    def traced(case):
        with lock:
            running.add(case.case_id)
            started.append(case.case_id)
            most[0] = max(most[0], len(running))
            lane_threads.append(torch.get_num_threads())
        time.sleep(0.2)  # long enough for the other lane to start
        try:
            return run(case)
        finally:
            with lock:
                running.discard(case.case_id)

    monkeypatch.setattr(job, "run", traced)
    threads = torch.get_num_threads()
    assert [r.status for r in segment_cases(cases, job, lanes=2)].count("succeeded") == 3
    assert most[0] == 2
    assert set(lane_threads) == {max(1, threads // 2)}

    # stopping early: the first case runs at once, the others wait until the caller has its first result and has
    # stopped; the second lane's case and the next are then in flight, the last one never starts
    late = CaseJob(tmp_path / "early", job.predictor)
    run_late = late.run
    started.clear()
    stopped = threading.Event()

    def waits_after_first(case):
        with lock:
            started.append(case.case_id)
        if case is not cases[0]:
            assert stopped.wait(30)
        return run_late(case)

    monkeypatch.setattr(late, "run", waits_after_first)
    batch = segment_cases(cases, late, lanes=2)
    assert next(batch).case_id == cases[0].case_id
    threading.Timer(0.5, stopped.set).start()  # the close below waits for the cases in flight
    batch.close()
    assert sorted(started) == sorted(c.case_id for c in cases[:3])  # the fourth was never started
    assert torch.get_num_threads() == threads
