"""What each ``tessera`` sub-command does; argument parsing lives in :mod:`app.cli.main`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterable
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

if TYPE_CHECKING:
    from pipelines.ingestion.dicomweb import Credentials, Transport
    from pipelines.segment import CaseResult

log = logging.getLogger("tessera")


def tool_version() -> str:
    from app import __version__

    return __version__


class _TqdmHandler(logging.Handler):
    """Log lines that do not tear progress bars apart."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)


def configure_logging(verbose: bool = False) -> None:
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s" if verbose else "%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("monai", "nibabel", "PIL", "matplotlib", "highdicom", "pydicom", "dicomweb_client"):
        logging.getLogger(noisy).setLevel(logging.WARNING if verbose else logging.ERROR)
    if not verbose:
        import warnings

        warnings.filterwarnings("ignore")


def _dataset_label_names(dataset: str) -> dict[str, str]:
    try:
        return dict(json.loads((Path(dataset) / "dataset.json").read_text())["labels"])
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _label_values(text: str) -> list[int] | None:
    """``all`` -> None (every label), ``none`` -> [], ``1,3`` -> [1, 3]."""
    from pipelines.errors import UsageError

    if text.strip().lower() == "all":
        return None
    if text.strip().lower() == "none":
        return []
    try:
        return sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise UsageError("BAD_ARGUMENT", f"--keep-largest takes all, none or label values like 1,2; got {text!r}") \
            from None


def train(args: argparse.Namespace) -> int:
    from models.families import get_family
    from pipelines.phantoms import STRUCTURES
    from pipelines.training import TrainingConfig
    from pipelines.training import train as run_training

    network = get_family(args.family).network_from_args(args)
    intensity = {"kind": "window", "a_min": -300.0, "a_max": 700.0, "b_min": 0.0, "b_max": 1.0}
    if args.window:
        intensity.update(a_min=args.window[0], a_max=args.window[1])
    if args.intensity != "window":
        intensity = {"kind": args.intensity}
    config = TrainingConfig(
        name=args.name, iterations=args.iterations, batch_size=args.batch_size, crop_size=args.crop,
        learning_rate=args.lr, validate_every=args.validate_every, validation_cases=args.validation_cases,
        seed=args.seed, device=args.device, network=network, spacing=args.spacing, intensity=intensity,
        roi_size=args.roi, init_weights=args.init, save_fp16=args.save_fp16, family=args.family, loss=args.loss,
        recipe=args.recipe, keep_largest=_label_values(args.keep_largest),
        crop_centres=args.crop_centres, mirror_axes=args.mirror_axes, soft_labels=args.soft_labels,
    )
    # Display colours for labels the phantom generator knows by name; other datasets get viewer defaults.
    colors = {s.value: s.color for s in STRUCTURES}
    names = _dataset_label_names(args.dataset)
    colors = {v: c for v, c in colors.items() if names.get(str(v)) == STRUCTURES[v - 1].name}
    with tqdm(total=args.iterations, desc="training", unit="it", disable=None) as bar:
        def advance(iteration: int, loss: float) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")

        manifest = run_training(args.dataset, args.output, config, colors=colors, on_progress=advance)
    best = manifest.training.get("best_validation_mean_dice")
    log.info("model '%s' written to %s (best validation mean Dice %s)", manifest.name, args.output, best)
    return 0


def segment(args: argparse.Namespace) -> int:
    from models.registry import resolve_model
    from pipelines.cases import discover_cases
    from pipelines.ingestion.reading import ReadOptions
    from pipelines.pacs import PacsRun, split_inputs
    from pipelines.segment import OutputOptions, RunSettings

    if args.lanes is not None and args.lanes < 1:
        from pipelines.errors import UsageError

        raise UsageError("BAD_ARGUMENT", f"--lanes takes a number of cases, 1 or more; got {args.lanes}")
    if args.backend == "ray":
        from app.jobs.ray_cluster import import_ray

        import_ray()  # BACKEND_UNAVAILABLE before any work
    manifest = resolve_model(args.model)
    paths, references = split_inputs(args.inputs)
    cases = discover_cases(paths, channels=len(manifest.channels)) if paths else []
    formats = frozenset(f.strip() for f in args.format.split(",") if f.strip()) if args.format else None
    if args.push and formats is not None:
        formats |= {"dicom-seg"}  # what a push stores
    sampling = {k: v for k, v in (("steps", args.steps), ("members", args.members), ("seed", args.seed))
                if v is not None}
    settings = RunSettings(model=args.model, device=args.device, amp=args.amp, sampling=sampling,
                           keep_largest=not args.no_keep_largest,
                           read_options=ReadOptions(series=args.series, tilt=args.tilt, min_slices=args.min_slices),
                           outputs=OutputOptions(formats=formats, seg_type=args.seg_type,
                                                 omit_empty_frames=not args.keep_empty_frames))
    if not cases and not references:
        log.error("no cases (NIfTI files, DICOM folders or zips) found in %s", ", ".join(args.inputs))
        return 2
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    _log_run_to(output, verbose=args.verbose)
    pacs = PacsRun(_dicomweb_cache(args), *_dicomweb_access(args), push=args.push)
    fetched, unfetched = pacs.fetch(references, output)
    cases += fetched
    if args.backend == "ray":
        from app.jobs.ray_batch import segment_cases_on_ray

        log.info("model %s %s on Ray (%s); %d case(s) -> %s", manifest.name, manifest.version,
                 args.ray_address or "local", len(cases), output)
        results = segment_cases_on_ray(cases, output, settings, overwrite=args.overwrite, address=args.ray_address)
    else:
        from pipelines.segment import default_lanes, segment_cases

        predictor = settings.predictor()
        lanes = 1 if args.no_overlap else args.lanes or default_lanes(predictor.device, len(cases))
        log.info("model %s %s on %s; %d case(s) -> %s%s", manifest.name, manifest.version, predictor.device,
                 len(cases), output, f" ({lanes} at a time)" if lanes > 1 else "")
        job = settings.case_job(output, predictor, overwrite=args.overwrite, progress=sys.stderr.isatty())
        results = segment_cases(cases, job, overlap=not args.no_overlap, lanes=lanes)
    counts = _tally(chain(unfetched, pacs.pushed(results)), len(cases) + len(unfetched))
    summary = {"cases": len(cases) + len(unfetched), **counts, "model": manifest.name, "output": str(output)}
    (output / "run_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info("%d succeeded, %d failed, %d skipped", counts["succeeded"], counts["failed"], counts["skipped"])
    return 1 if counts["failed"] else 0


def _dicomweb_access(args: argparse.Namespace) -> tuple[Credentials, Transport]:
    """Credentials from the options, else the environment; the timeout of each request."""
    from pipelines.ingestion.dicomweb import Credentials, Transport

    return (Credentials.from_environment(args.dicomweb_user, token=args.dicomweb_token),
            Transport(timeout_s=args.dicomweb_timeout))


def _dicomweb_cache(args: argparse.Namespace) -> Path:
    from pipelines.ingestion.dicomweb import default_cache

    return Path(args.dicomweb_cache).expanduser() if args.dicomweb_cache else default_cache()


def _log_run_to(output: Path, verbose: bool) -> None:
    """The run's debug log into ``output/tessera.log``; the terminal keeps its own level."""
    run_log = logging.FileHandler(output / "tessera.log")
    run_log.setLevel(logging.DEBUG)
    run_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(run_log)
    logging.getLogger().setLevel(logging.DEBUG)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, _TqdmHandler) and not verbose:
            handler.setLevel(logging.INFO)


def _tally(results: Iterable[CaseResult], total: int) -> dict[str, int]:
    """Each case's result counted and logged as it comes (a failure with its code), under a progress bar."""
    counts = {"succeeded": 0, "failed": 0, "skipped": 0}
    with tqdm(total=total, desc="cases", unit="case", disable=None) as bar:
        for result in results:
            bar.update(1)
            bar.set_postfix_str(result.case_id)
            counts[result.status] += 1
            if result.status == "failed":
                log.error("FAILED %s: %s: %s", result.case_id, result.error_code, result.error_message)
            elif result.status == "skipped":
                log.info("skipped %s (already done; --overwrite to redo)", result.case_id)
    return counts


def models_list(args: argparse.Namespace) -> int:
    from models.registry import list_manifests

    manifests = list_manifests()
    if not manifests:
        print("no models registered")
        return 0
    print(f"{'name':<28} {'version':<9} {'family':<12} {'channels':<10} labels")
    for m in manifests:
        channels = "+".join(c.modality for c in m.channels)
        print(f"{m.name:<28} {m.version:<9} {m.family:<12} {channels:<10} {', '.join(m.label_names().values())}")
    return 0


def models_show(args: argparse.Namespace) -> int:
    from models.registry import resolve_model

    manifest = resolve_model(args.name)
    data = manifest.to_json()
    data["weights_path"] = str(manifest.weights_path)
    print(json.dumps(data, indent=2))
    return 0


def models_add(args: argparse.Namespace) -> int:
    from models.registry import register_model

    manifest = register_model(args.manifest, overwrite=args.overwrite)
    log.info("registered '%s' at %s", manifest.name, manifest.manifest_path)
    return 0


def evaluate(args: argparse.Namespace) -> int:
    from pipelines.evaluation_run import evaluate_folder, format_table

    output = Path(args.output) if args.output else Path(args.pred) / "metrics.json"
    metrics = evaluate_folder(Path(args.pred), Path(args.truth), Path(args.labels) if args.labels else None)
    output.write_text(json.dumps(metrics, indent=2) + "\n")
    print(format_table(metrics))
    print(f"metrics written to {output}")
    return 1 if metrics["failed_cases"] else 0


def sample_data(args: argparse.Namespace) -> int:
    from pipelines.phantoms import write_dataset
    from pipelines.phantoms_hnc import write_hnc_dataset

    writer = write_hnc_dataset if args.kind == "hnc" else write_dataset
    root = writer(args.output, n_train=args.train, n_test=args.test, first_seed=args.first_seed)
    log.info("wrote %d training and %d test phantoms to %s", args.train, args.test, root)
    return 0


def export_seg(args: argparse.Namespace) -> int:
    from pipelines.writers.export import export_seg as run_export

    path = run_export(Path(args.mask), Path(args.source), Path(args.output),
                      labels_path=Path(args.labels) if args.labels else None, series=args.series)
    log.info("wrote %s (verified against the mask)", path)
    return 0


def convert(args: argparse.Namespace) -> int:
    from pipelines.ingestion.dicom.conversion import convert_study
    from pipelines.ingestion.dicomweb import DicomWebServer, parse_reference

    source = Path(args.input)
    reference = parse_reference(args.input)
    if reference is not None:  # a study or series on a DICOMweb server: fetched into the cache first
        source = DicomWebServer(reference.root, *_dicomweb_access(args)).fetch(reference, _dicomweb_cache(args))
    outcome = convert_study(source, Path(args.output), all_series=args.all_series, series=args.series,
                            modality=args.modality, tilt=args.tilt, min_slices=args.min_slices)
    for item in outcome.written:
        log.info("wrote %s (%s)", item["file"], item["reason"])
    for item in outcome.refused:
        log.error("REFUSED %s: %s: %s", item["series"], ",".join(item["codes"]), item["message"])
    for item in outcome.set_aside:
        log.info("set aside series %s: %s", item["series_number"], item["reason"])
    log.info("%d volume(s) written, %d refused, %d set aside -> %s", len(outcome.written), len(outcome.refused),
             len(outcome.set_aside), args.output)
    return 1 if outcome.selected_refused else 0


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from app.service.app import create_app
    from app.service.http import with_header_timeout
    from app.service.logs import configure_service_logging
    from app.service.settings import load_settings

    configure_service_logging("server", verbose=args.verbose)
    settings = load_settings(Path(args.config) if args.config else None, host=args.host, port=args.port,
                             data_dir=args.data_dir, default_model=args.model, device=args.device,
                             concurrency=args.concurrency, auth=False if args.no_auth else None,
                             executor=args.executor, ray_address=args.ray_address)
    if settings.executor == "ray":
        from app.jobs.ray_cluster import check_reachable, import_ray

        import_ray()  # BACKEND_UNAVAILABLE, RAY_UNREACHABLE before the server starts
        if settings.ray_address:
            check_reachable(settings.ray_address)
    app = create_app(settings)
    app.state.tessera.lock_data_dir()  # a second server on the same data is a usage error, before uvicorn starts
    log.info("Tessera service on http://%s:%d (docs at /docs)", settings.host, settings.port)
    uvicorn.run(app, host=settings.host, port=settings.port, log_config=None, access_log=True,
                timeout_graceful_shutdown=30, http=with_header_timeout(settings.header_timeout_s))
    return 0


def _key_store(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from app.jobs.store import JobStore
    from app.service.settings import ServiceSettings

    return JobStore(ServiceSettings(data_dir=Path(args.data_dir)).database)


def keys_create(args: argparse.Namespace) -> int:
    from app.jobs.keys import create_key

    token = create_key(_key_store(args), args.name)
    log.info("new API key '%s' (shown once; store it now):", args.name)
    print(token)  # the key alone on the last line, for scripts
    return 0


def keys_list(args: argparse.Namespace) -> int:
    import time

    for key in _key_store(args).list_keys():
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(key.created_at))
        status = "revoked" if key.revoked_at else "active"
        print(f"{key.id}  {key.name:<24} {created}  {status}")
    return 0


def keys_revoke(args: argparse.Namespace) -> int:
    from pipelines.errors import UsageError

    key = _key_store(args).revoke_key(args.key)
    if key is None:
        raise UsageError("KEY_NOT_FOUND", f"no key with name or id {args.key!r}")
    log.info("revoked key '%s' (%s)", key.name, key.id)
    return 0
