"""A batch with reading and writing overlapped with prediction gives what the one-at-a-time loop gives."""

from __future__ import annotations

import json
import shutil
import threading

import nibabel as nib
import numpy as np

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


def test_overlapped_batch_equals_the_sequential_loop(tmp_path, small_phantom_files, tiny_model):
    folder = _folder(tmp_path, small_phantom_files)
    cases = discover_cases([str(folder)], channels=1)
    predictor = Predictor(load_manifest(tiny_model.manifest_path), device="cpu")
    results = {}
    for mode in ("sequential", "overlapped"):
        out = tmp_path / mode
        results[mode] = list(segment_cases(cases, CaseJob(out, predictor), overlap=mode == "overlapped"))
    sequential, overlapped = results["sequential"], results["overlapped"]
    assert [(r.case_id, r.status, r.error_code) for r in overlapped] == \
        [(r.case_id, r.status, r.error_code) for r in sequential]
    assert {r.case_id: r.status for r in overlapped} == {"again": "succeeded", "broken": "failed",
                                                         "case3": "succeeded", "case4": "succeeded"}
    for result in overlapped:
        report = json.loads((result.output_dir / "report.json").read_text())
        if result.status != "succeeded":
            assert report["error"]["code"] == "NIFTI_UNREADABLE"
            continue
        ours = np.asarray(nib.load(result.output_dir / "mask.nii.gz").dataobj)
        theirs = np.asarray(nib.load(tmp_path / "sequential" / result.case_id / "mask.nii.gz").dataobj)
        assert np.array_equal(ours, theirs)
        stages = report["timings_s"]
        assert {"read", "preprocess", "predict", "to_source_grid", "write", "total"} <= set(stages)
        assert stages["total"] >= max(v for k, v in stages.items() if k != "total")
    assert not list((tmp_path / "overlapped").glob(".*.partial"))


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
