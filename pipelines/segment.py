"""One case, one way: read -> prepare -> predict -> back to the source grid -> postprocess -> write.

The CLI, the service and batch backends all call :func:`segment_case` (or :func:`segment_volume`
when the volume is already in memory); none of them re-implements a step.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.cases import CaseInput
from pipelines.errors import TesseraError
from pipelines.inference import Predictor
from pipelines.inference.sliding_window import SlabSink, StitchPlan
from pipelines.ingestion.reading import CaseVolume, ReadOptions, read_case
from pipelines.labels_back import SlabLabels
from pipelines.outputs import DICOM_ONLY_FORMATS, OutputOptions
from pipelines.postprocessing import keep_largest_components, label_array_dtype, labels_from_probabilities
from pipelines.preprocessing import GridMapping, PreparedInput, prepare
from pipelines.processes import stage_progress
from pipelines.volume import Volume
from pipelines.writers.nifti import write_float_maps, write_mask, write_probabilities
from pipelines.writers.report import label_table, software_versions, write_json
from pipelines.writers.seg import OutputError

log = logging.getLogger(__name__)


ProgressCallback = Callable[[str, float], None]
"""Called with (stage, fraction of that stage done); may raise :class:`pipelines.errors.Interrupted` to stop."""


@dataclass
class StageTimer:
    seconds: dict[str, float] = field(default_factory=dict)
    listener: ProgressCallback | None = None

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self.listener is not None:
            self.listener(name, 0.0)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 4)


@dataclass
class Segmentation:
    """A label map on the source grid of ``volume`` and what it took to make it."""

    labels: np.ndarray
    volume: Volume
    mapping: GridMapping
    timer: StageTimer
    warnings: list[str] = field(default_factory=list)
    probabilities: np.ndarray | None = None  # (K, *grid) on the source grid, when asked for
    maps: dict[str, np.ndarray] = field(default_factory=dict)  # a family's extra maps (n, *grid), e.g. uncertainty
    plan: StitchPlan | None = None  # how the windows were stitched (window-by-window families)
    runtime: dict[str, Any] = field(default_factory=dict)  # how the prediction was made (kernels, sampler, seeds)


def segment_volume(
    volume: Volume,
    predictor: Predictor,
    *,
    keep_largest: bool = True,
    progress: bool | ProgressCallback = False,
    timer: StageTimer | None = None,
    keep_probabilities: bool = False,
    prepared: PreparedInput | None = None,
) -> Segmentation:
    """Segment an in-memory volume; the labels have exactly ``volume``'s shape and affine. ``prepared``: the
    model-space input already made of ``volume`` (by :func:`~pipelines.preprocessing.prepare`)."""
    timer = timer or StageTimer()
    manifest = predictor.manifest
    warnings: list[str] = []
    if prepared is None:
        with timer.stage("preprocess"):
            prepared = prepare(volume, manifest.preprocessing)
    with timer.stage("predict"):
        windows = _window_progress(progress) if callable(progress) else progress
        # labels only: the probabilities go back to the source grid slab by slab as the engine finishes them,
        # never held whole (that time is the way back's, not the prediction's)
        slabs = None if keep_probabilities else prepared.mapping.slab_labels(manifest.num_classes, predictor.device)
        sink, sink_seconds = _timed_sink(slabs)
        prediction = predictor.predict(prepared.image, progress=windows, slab_sink=sink)
        probabilities = prediction.probabilities
        warnings += prediction.warnings
    timer.seconds["predict"] = round(timer.seconds["predict"] - sink_seconds[0], 4)
    with timer.stage("to_source_grid"):
        if slabs is not None:
            timer.seconds["to_source_grid"] = round(sink_seconds[0], 4)
            labels = prepared.mapping.labels_from_slabs(slabs).numpy().astype(label_array_dtype(manifest.num_classes))
            on_source = None
        elif keep_probabilities:
            on_source = prepared.mapping.to_source(probabilities)
            labels = labels_from_probabilities(on_source, manifest.num_classes)
        else:  # grids not axis-aligned: a few classes at a time, 100+ class models stay within memory
            labels = prepared.mapping.labels_to_source(probabilities, by_cells=False).numpy()
            labels = labels.astype(label_array_dtype(manifest.num_classes))
            on_source = None
        maps = {name: prepared.mapping.to_source(values).numpy().astype(np.float32)
                for name, values in prediction.maps.items()}
    with timer.stage("postprocess"):
        if keep_largest and manifest.keep_largest_component:
            labels = keep_largest_components(labels, manifest.keep_largest_component)
    if labels.shape != volume.spatial_shape:  # guaranteed by construction; a failure here is a bug
        raise AssertionError(f"mask shape {labels.shape} != source shape {volume.spatial_shape}")
    kept = on_source.numpy().astype(np.float32) if on_source is not None else None
    return Segmentation(labels=labels, volume=volume, mapping=prepared.mapping, timer=timer, warnings=warnings,
                        probabilities=kept, maps=maps, plan=prediction.plan, runtime=prediction.details)


def _timed_sink(slabs: SlabLabels | None) -> tuple[SlabSink | None, list[float]]:
    """``slabs.add`` and the seconds spent in it so far (the way back, run inside the prediction)."""
    seconds = [0.0]
    if slabs is None:
        return None, seconds

    def add(start: int, values: torch.Tensor) -> None:
        began = time.perf_counter()
        slabs.add(start, values.float())
        seconds[0] += time.perf_counter() - began

    return add, seconds


def _window_progress(progress: ProgressCallback) -> Callable[[int, int], None]:
    return lambda done, total: progress("predict", done / max(total, 1))


# --- one case from file to folder -------------------------------------------------------------

REPORT_NAME = "report.json"
MASK_NAME = "mask.nii.gz"
LABELS_NAME = "labels.json"
@dataclass
class CaseResult:
    case_id: str
    status: str  # "succeeded", "failed" or "skipped"
    output_dir: Path
    error_code: str | None = None
    error_message: str | None = None
    seconds: float = 0.0


def is_finished(case_dir: Path) -> bool:
    """A case counts as done only when its report says so and its mask exists."""
    report = case_dir / REPORT_NAME
    try:
        data = json.loads(report.read_text())
    except (OSError, ValueError):
        return False
    return data.get("status") == "succeeded" and (case_dir / MASK_NAME).is_file()


def skipped_case(case: CaseInput, output_root: Path, overwrite: bool) -> CaseResult | None:
    """The result of a case that a resumed run skips (finished before, not ``overwrite``), else None."""
    case_dir = output_root / case.case_id
    if not overwrite and is_finished(case_dir):
        return CaseResult(case.case_id, "skipped", case_dir)
    return None


def staging_dir(output_root: Path, case_id: str) -> Path:
    """Where a case's outputs are written before they are renamed into place (hidden: never looks finished)."""
    return output_root / f".{case_id}.partial"


def publish_case(staging: Path, case_dir: Path) -> Path:
    """Rename a complete staging folder into place, replacing an older result: the one atomic step that makes a
    case's outputs visible. Returns ``case_dir``."""
    if case_dir.exists():
        shutil.rmtree(case_dir)
    staging.rename(case_dir)
    return case_dir


@dataclass(frozen=True)
class RunSettings:
    """What a run asks of every case, picklable: a distributed backend ships it to its workers, and each worker
    builds the same :class:`Predictor` and :class:`CaseJob` from it as the local run does."""

    model: str | None = None  # a registered name or a manifest path (resolved where the predictor is built)
    device: str = "auto"
    amp: bool = False
    sampling: dict[str, int] = field(default_factory=dict)
    keep_largest: bool = True
    read_options: ReadOptions | None = None
    outputs: OutputOptions | None = None

    def predictor(self) -> Predictor:
        from models.registry import resolve_model

        return Predictor(resolve_model(self.model), device=self.device, amp=self.amp)  # sampling: per job

    def case_job(self, output_root: Path, predictor: Predictor, *, overwrite: bool = False,
                 progress: bool | ProgressCallback = False) -> CaseJob:
        return CaseJob(output_root, predictor.with_sampling(self.sampling) if self.sampling else predictor,
                       keep_largest=self.keep_largest, overwrite=overwrite, progress=progress,
                       read_options=self.read_options, outputs=self.outputs)


def segment_case(
    case: CaseInput,
    output_root: Path,
    predictor: Predictor,
    *,
    keep_largest: bool = True,
    overwrite: bool = False,
    progress: bool | ProgressCallback = False,
    read_options: ReadOptions | None = None,
    outputs: OutputOptions | None = None,
) -> CaseResult:
    """Segment one input file into ``output_root/<case_id>/``; never raises for a bad case.

    Results are written into a ``.partial`` folder that is renamed into place at the end, so an
    interrupted run never leaves a half-written case that looks finished. ``progress``: a terminal bar
    (``True``) or a callback told each stage and the fraction of windows done; when the callback raises
    :class:`~pipelines.errors.Interrupted` the case stops there, nothing is written.
    """
    return CaseJob(output_root, predictor, keep_largest=keep_largest, overwrite=overwrite, progress=progress,
                   read_options=read_options, outputs=outputs).run(case)


def segment_cases(cases: Sequence[CaseInput], job: CaseJob, *, overlap: bool = True,
                  lanes: int = 1) -> Iterator[CaseResult]:
    """Every case of a batch through ``job``, results in order; a case that fails, fails alone, as in the
    sequential loop.

    ``lanes`` > 1: that many cases at once, each read, predicted and written on its own thread, the torch threads
    shared out among them (on a few CPU cores, two cases on one thread each keep the cores busier than one case on
    two: a forward's threads wait on each other); at most ``lanes`` cases in memory. Otherwise ``overlap``: the
    next case is read (and its volume held) and the previous one written while the current one is predicted, on
    two threads (reading and writing are mostly zlib and numpy, which let go of the GIL): at most three cases in
    memory, one ahead and one behind.
    """
    if lanes > 1 and len(cases) > 1:
        yield from _in_lanes(cases, job, min(lanes, len(cases)))
        return
    if not overlap:
        yield from (job.run(case) for case in cases)
        return
    with ThreadPoolExecutor(1, thread_name_prefix="tessera-read") as reader, \
            ThreadPoolExecutor(1, thread_name_prefix="tessera-write") as writer:
        ahead = reader.submit(job.read, cases[0]) if cases else None
        behind: Future[CaseResult] | None = None
        for index in range(len(cases)):
            assert ahead is not None
            run = ahead.result()
            ahead = reader.submit(job.read, cases[index + 1]) if index + 1 < len(cases) else None
            if not isinstance(run, CaseResult):
                job.compute(run)
            if behind is not None:
                yield behind.result()
            behind = writer.submit(job.write, run) if not isinstance(run, CaseResult) else None
            if behind is None:
                yield run  # type: ignore[misc]
        if behind is not None:
            yield behind.result()


def _in_lanes(cases: Sequence[CaseInput], job: CaseJob, lanes: int) -> Iterator[CaseResult]:
    """``lanes`` cases at a time, each whole on its own thread (queued cases are only paths); the torch threads
    divided among the lanes for the run and restored after it, also when the caller stops early."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // lanes))  # threads started from here on take the per-lane count
    pool = ThreadPoolExecutor(lanes, thread_name_prefix="tessera-lane")
    try:
        for result in [pool.submit(job.run, case) for case in cases]:
            yield result.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # an early stop lets the running cases finish, starts no more
        torch.set_num_threads(threads)


def default_lanes(device: torch.device, cases: int) -> int:
    """How many cases a batch predicts at once by default: two on the CPU when torch has at least two threads
    (each lane then gets half of them; measured on 2 cores by ``bench/whole_case.py``), one on a GPU, where the
    staged overlap keeps the device busy and a second lane would hold its own activations in the GPU's memory."""
    return 2 if device.type == "cpu" and cases >= 2 and torch.get_num_threads() >= 2 else 1


@dataclass
class CaseRun:
    """One case in flight between the stages of a :class:`CaseJob`."""

    case: CaseInput
    staging: Path
    started: float
    timer: StageTimer
    report: dict[str, Any]
    case_volume: CaseVolume | None = None
    prepared: PreparedInput | None = None
    formats: frozenset[str] = frozenset()
    result: Segmentation | None = None
    error: TesseraError | None = None


@dataclass
class CaseJob:
    """How the cases of one run are segmented: read (and prepare the model input), compute (predict, back to
    the source grid) and write (keep-largest-component, outputs), as three calls so that a batch can overlap
    them (:func:`segment_cases`)."""

    output_root: Path
    predictor: Predictor
    keep_largest: bool = True
    overwrite: bool = False
    progress: bool | ProgressCallback = False
    read_options: ReadOptions | None = None
    outputs: OutputOptions | None = None

    def run(self, case: CaseInput) -> CaseResult:
        """One case, its three stages one after the other."""
        run = self.read(case)
        if isinstance(run, CaseResult):
            return run
        self.compute(run)
        return self.write(run)

    def read(self, case: CaseInput) -> CaseRun | CaseResult:
        """The skip check, a fresh staging folder, the read and preprocess stages (an error kept for
        :meth:`write`)."""
        skipped = skipped_case(case, self.output_root, self.overwrite)
        if skipped is not None:
            return skipped
        progress = self.progress
        run = CaseRun(case, staging_dir(self.output_root, case.case_id), time.perf_counter(),
                      StageTimer(listener=progress if callable(progress) else None),
                      _report_header(case, self.predictor, self.keep_largest))
        shutil.rmtree(run.staging, ignore_errors=True)
        run.staging.mkdir(parents=True)
        with _case_errors(run):
            read_progress = (lambda fraction: progress("read", fraction)) if callable(progress) else None
            with run.timer.stage("read"), stage_progress(read_progress):
                run.case_volume = read_case(list(case.paths), self.predictor.manifest.channels, case.case_id,
                                            self.read_options)
                run.report["input_provenance"] = run.case_volume.provenance
            run.formats = (self.outputs or OutputOptions()).for_case(run.case_volume.dicom_source is not None)
            needs_dicom = sorted(set(DICOM_ONLY_FORMATS) & run.formats)
            if needs_dicom and run.case_volume.dicom_source is None:
                raise OutputError("SEG_NEEDS_DICOM", f"{' and '.join(needs_dicom)} reference the source DICOM series; "
                                                     "this case's input is NIfTI (drop them from --format, or use "
                                                     "export-seg)")
            with run.timer.stage("preprocess"):  # on the reading side: a batch overlaps it with a prediction
                run.prepared = prepare(run.case_volume.volume, self.predictor.manifest.preprocessing)
        return run

    def compute(self, run: CaseRun) -> None:
        """Predict and back to the source grid (nothing when the read failed)."""
        if run.error is not None or run.case_volume is None:
            return
        with _case_errors(run):
            fractional = (self.outputs or OutputOptions()).seg_type == "fractional" and "dicom-seg" in run.formats
            run.result = segment_volume(run.case_volume.volume, self.predictor, keep_largest=False,
                                        progress=self.progress, timer=run.timer,
                                        keep_probabilities="probabilities" in run.formats or fractional,
                                        prepared=run.prepared)
            run.prepared = None
            run.result.warnings[:0] = run.case_volume.warnings
            if run.result.plan is not None:
                run.report["settings"]["stitch_plan"] = asdict(run.result.plan)
            if run.result.runtime:
                run.report["settings"]["network_runtime"] = run.result.runtime

    def write(self, run: CaseRun) -> CaseResult:
        """Keep-largest-component, the outputs and the report into the staging folder, renamed into place; the
        case's result."""
        if run.error is None and run.result is not None and run.case_volume is not None:
            with _case_errors(run):
                result = run.result
                kept = self.predictor.manifest.keep_largest_component
                if self.keep_largest and kept:  # on the writing side: a batch overlaps it with a prediction
                    with run.timer.stage("postprocess"):
                        result.labels = keep_largest_components(result.labels, kept)
                with run.timer.stage("write"):
                    written = _write_outputs(result, run.case_volume, self.predictor, self.outputs or OutputOptions(),
                                             run.formats, run.staging)
                run.report.update(status="succeeded", warnings=result.warnings, geometry=_geometry(result),
                                  outputs=written,
                                  label_voxels=_label_voxels(result.labels, self.predictor.manifest.label_names()))
        seconds = round(time.perf_counter() - run.started, 3)
        run.report["timings_s"] = {**run.timer.seconds, "total": seconds}
        if run.error is not None:
            run.report.update(status="failed", error={"code": run.error.code, "message": run.error.message})
        write_json(run.report, run.staging / REPORT_NAME)
        case_dir = publish_case(run.staging, self.output_root / run.case.case_id)
        run.result = run.case_volume = None  # the batch holds no case longer than it needs to
        if run.error is not None:
            return CaseResult(run.case.case_id, "failed", case_dir, run.error.code, run.error.message, seconds)
        return CaseResult(run.case.case_id, "succeeded", case_dir, seconds=seconds)


@contextmanager
def _case_errors(run: CaseRun) -> Iterator[None]:
    """A coded error or a bug inside ends this case (kept on ``run``), never the batch."""
    try:
        yield
    except TesseraError as exc:
        run.error = exc
    except Exception as exc:  # a bug or an unforeseen input: the case fails, the batch goes on
        log.debug("case %s failed with an internal error", run.case.case_id, exc_info=True)
        run.error = TesseraError("INTERNAL_ERROR", f"{type(exc).__name__}: "
                                                   f"{str(exc).splitlines()[0] if str(exc) else ''}")


def _write_outputs(
    result: Segmentation,
    case_volume: CaseVolume,
    predictor: Predictor,
    options: OutputOptions,
    formats: frozenset[str],
    folder: Path,
) -> list[str]:
    """Every requested output of one case into ``folder``; returns the file names written."""
    manifest, volume = predictor.manifest, result.volume
    write_json(label_table(manifest), folder / LABELS_NAME)
    written = [LABELS_NAME]
    if "nifti" in formats:
        write_mask(result.labels, volume, folder / MASK_NAME)
        written.append(MASK_NAME)
    for name, values in result.maps.items():  # e.g. uncertainty: a family's extra maps, always written
        write_float_maps(values, volume, folder / f"{name}.nii.gz", description=f"tessera {name}")
        written.append(f"{name}.nii.gz")
    if "probabilities" in formats and result.probabilities is not None:
        write_probabilities(result.probabilities, volume, folder / "probabilities.nii.gz")
        written.append("probabilities.nii.gz")
    if "stats" in formats:
        from pipelines.writers.statistics import label_statistics, uncertainty_by_label, write_statistics

        names = manifest.label_names()
        spread = _member_spread(result)
        extra = None if spread is None else uncertainty_by_label(result.labels, spread, sorted(names))
        write_statistics(label_statistics(result.labels, volume, names), folder / "stats.json", folder / "stats.csv",
                         extra=extra)
        written += ["stats.json", "stats.csv"]
    if "preview" in formats:
        from pipelines.writers.preview import render_preview

        legend = [(lbl.value, lbl.name, lbl.color) for lbl in manifest.labels]
        spread = _member_spread(result)
        render_preview(volume, result.labels, legend, folder / "preview.png",
                       title=f"{volume.metadata.case_id} - {manifest.name} {manifest.version}",
                       uncertainty=None if spread is None else spread.max(0))
        written.append("preview.png")
    if "dicom-seg" in formats and case_volume.dicom_source is not None:
        from pipelines.writers.seg import SegAlgorithm, write_dicom_seg

        probabilities = result.probabilities if options.seg_type == "fractional" else None
        write_dicom_seg(result.labels, case_volume.dicom_source, manifest.labels,
                        SegAlgorithm(manifest.name, manifest.version), folder / "seg.dcm",
                        probabilities=probabilities, omit_empty_frames=options.omit_empty_frames,
                        software_version=software_versions()["tessera"])
        written.append("seg.dcm")
    if "rtstruct" in formats and case_volume.dicom_source is not None:
        from pipelines.writers.rtstruct import write_rtstruct
        from pipelines.writers.seg import SegAlgorithm

        write_rtstruct(result.labels, case_volume.dicom_source, manifest.labels,
                       SegAlgorithm(manifest.name, manifest.version), folder / "rtstruct.dcm",
                       software_version=software_versions()["tessera"])
        written.append("rtstruct.dcm")
    return written


def _member_spread(result: Segmentation) -> np.ndarray | None:
    """Per foreground class, the across-member standard deviation on the source grid: the first half of the
    ``uncertainty`` map (std per class, then entropy per class), or None for a family that does not sample."""
    uncertainty = result.maps.get("uncertainty")
    return None if uncertainty is None else uncertainty[: uncertainty.shape[0] // 2]


def _report_header(case: CaseInput, predictor: Predictor, keep_largest: bool) -> dict[str, Any]:
    manifest = predictor.manifest
    return {
        "status": "running",
        "case": case.case_id,
        "input": [path.name for path in case.paths],
        "versions": software_versions(),
        "model": {
            "name": manifest.name,
            "version": manifest.version,
            "family": manifest.family,
            "weights_sha256": predictor.weights_sha256,
        },
        "device": str(predictor.device),
        "settings": {
            "roi_size": list(predictor.window.roi_size),
            "overlap": predictor.window.overlap,
            "mode": predictor.window.mode,
            "sw_batch_size": predictor.window.sw_batch_size,
            "amp": predictor.amp,
            "keep_largest_component": keep_largest,
            "preprocessing": asdict(manifest.preprocessing),
        },
        "warnings": [],
    }


def _geometry(result: Segmentation) -> dict[str, Any]:
    volume, mapping = result.volume, result.mapping
    return {
        "source_shape": list(volume.spatial_shape),
        "source_spacing_mm": [round(s, 5) for s in volume.spacing],
        "source_orientation": volume.orientation,
        "affine": np.round(volume.affine, 6).tolist(),
        "model_shape": list(mapping.model_shape),
        "resampled": mapping.resampled,
    }


def _label_voxels(labels: np.ndarray, names: dict[int, str]) -> dict[str, int]:
    size = max(names) + 1
    if labels.dtype == np.uint8:  # torch counts uint8 as it is; numpy's bincount first copies into 64-bit integers
        counts = torch.bincount(torch.from_numpy(labels).reshape(-1), minlength=size).numpy()
    else:
        counts = np.bincount(labels.ravel(), minlength=size)
    return {name: int(counts[value]) for value, name in sorted(names.items())}
