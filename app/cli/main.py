"""``tessera``: the command line. Exit codes: 0 all good, 1 some case failed, 2 usage error."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from app.cli import commands
from models.families import FAMILIES, LOSSES, all_families
from models.manifest import valid_mirror_axes
from pipelines.errors import TesseraError, UsageError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
# Errors in what the user typed rather than in the data: exit code 2 like argparse's own.
USAGE_CODES = {"MODEL_NOT_FOUND", "MANIFEST_NOT_FOUND", "INPUT_NOT_FOUND", "DUPLICATE_CASE", "CHANNELS_INCOMPLETE",
               "UNKNOWN_FORMAT"}


def _triple(text: str) -> tuple[float, float, float]:
    parts = [float(p) for p in text.replace("x", ",").split(",")]
    if len(parts) == 1:
        parts *= 3
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected one number or three (e.g. 64,64,32), got {text!r}")
    return (parts[0], parts[1], parts[2])


def _int_triple(text: str) -> tuple[int, int, int]:
    a, b, c = _triple(text)
    return (int(a), int(b), int(c))


def _int_list(text: str) -> list[int]:
    try:
        return [int(p) for p in text.split(",")]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc


def _mirror_axes(text: str) -> tuple[int, ...]:
    """``none`` -> (), ``0`` or ``0,1`` -> model-grid axes (each 0, 1 or 2, once)."""
    if text.strip().lower() == "none":
        return ()
    axes = tuple(_int_list(text))
    if not valid_mirror_axes(axes):
        raise argparse.ArgumentTypeError(f"expected none or distinct axes among 0,1,2, got {text!r}")
    return axes


def _add_dicom_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("DICOM input")
    group.add_argument("--series", default=None, help="use this SeriesInstanceUID or SeriesNumber")
    group.add_argument("--tilt", choices=("refuse", "resample"), default="refuse",
                       help="gantry-tilted series: refuse (default) or resample onto a regular grid")
    group.add_argument("--min-slices", type=int, default=3, help="fewest slices that make a volume (default 3)")


def _add_dicomweb_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("DICOMweb input (a study or series URL: http(s)://HOST/.../studies/UID"
                                      "[/series/UID])")
    group.add_argument("--dicomweb-user", default=None,
                       help="HTTP basic user (default $TESSERA_DICOMWEB_USER; the password only from "
                            "$TESSERA_DICOMWEB_PASSWORD)")
    group.add_argument("--dicomweb-token", default=None, help="bearer token (default $TESSERA_DICOMWEB_TOKEN)")
    group.add_argument("--dicomweb-timeout", type=float, default=30.0, help="seconds per request (default 30)")
    group.add_argument("--dicomweb-cache", default=None,
                       help="fetched instances, by SOP Instance UID (default $TESSERA_DICOMWEB_CACHE, else "
                            "$TESSERA_HOME/dicomweb-cache)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tessera", description="3D medical image segmentation")
    parser.add_argument("--version", action="version", version=f"tessera {commands.tool_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on the terminal")
    sub = parser.add_subparsers(dest="command", required=True)

    seg = sub.add_parser("segment", help="segment NIfTI files or folders of them")
    seg.add_argument("inputs", nargs="+", help="a NIfTI file, a folder of cases, or a DICOMweb study/series URL")
    seg.add_argument("-o", "--output", required=True, help="output folder: one sub-folder per case")
    seg.add_argument("--model", default=None, help="registered model name or a manifest.json path")
    seg.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    seg.add_argument("--overwrite", action="store_true", help="redo cases that already succeeded")
    seg.add_argument("--no-keep-largest", action="store_true", help="skip keep-largest-component")
    seg.add_argument("--no-overlap", action="store_true",
                     help="one case at a time, stage after stage (default: cases overlap, see --lanes)")
    seg.add_argument("--lanes", type=int, default=None,
                     help="cases predicted at once, each on its own thread with a share of the torch threads "
                          "(default: 2 on the CPU, 1 on a GPU); with 1 the next case is read and the previous one "
                          "written while one is predicted")
    seg.add_argument("--amp", action="store_true", help="mixed precision forward on CUDA")
    seg.add_argument("--backend", choices=("local", "ray"), default="local",
                     help="local (default): this machine; ray: cases spread over the actors of a Ray cluster "
                          "(extra 'ray'), one per GPU or per CPU node")
    seg.add_argument("--ray-address", default=None,
                     help="the Ray cluster's address, e.g. 10.0.0.1:6379 (default: $RAY_ADDRESS, else a Ray started "
                          "on this machine)")
    sampling = seg.add_argument_group("sampling families (diffusion)")
    sampling.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the model's, CPU budget)")
    sampling.add_argument("--members", type=int, default=None, help="ensemble members (default: the model's)")
    sampling.add_argument("--seed", type=int, default=None, help="sampling seed (default: the model's; recorded)")
    seg.add_argument("--format", default=None,
                     help="comma-separated outputs: nifti, dicom-seg, rtstruct, probabilities, stats, preview "
                          "(default: nifti,stats,preview, plus dicom-seg for DICOM input)")
    seg.add_argument("--seg-type", choices=("binary", "fractional"), default="binary",
                     help="DICOM-SEG type: binary labels (default) or fractional probabilities")
    seg.add_argument("--keep-empty-frames", action="store_true", help="DICOM-SEG: keep frames with no segment")
    _add_dicom_options(seg)
    _add_dicomweb_options(seg)
    seg.add_argument("--push", action="store_true",
                     help="store each DICOMweb case's DICOM-SEG (and RTSTRUCT) back on its server (STOW-RS)")
    seg.set_defaults(handler=commands.segment)

    cnv = sub.add_parser("convert", help="DICOM study/zip/file to NIfTI volumes with JSON sidecars")
    cnv.add_argument("input", help="a DICOM folder (searched recursively), a zip, one (multi-frame) file, or a "
                                   "DICOMweb study/series URL")
    cnv.add_argument("-o", "--output", required=True, help="output folder")
    cnv.add_argument("--all-series", action="store_true", help="every usable volume, not only the selected one")
    cnv.add_argument("--modality", default=None, help="prefer this modality when selecting (e.g. CT)")
    _add_dicom_options(cnv)
    _add_dicomweb_options(cnv)
    cnv.set_defaults(handler=commands.convert)

    exp = sub.add_parser("export-seg", help="a mask on a DICOM series' grid to a DICOM-SEG")
    exp.add_argument("--mask", required=True, help="label map NIfTI on the source series' grid (any axis order)")
    exp.add_argument("--source", required=True, help="the DICOM series/study the mask was made on")
    exp.add_argument("-o", "--output", required=True, help="SEG file to write")
    exp.add_argument("--labels", default=None, help="labels.json (Tessera) or dataset.json (MSD) with names")
    exp.add_argument("--series", default=None, help="SeriesInstanceUID or number when the study has several")
    exp.set_defaults(handler=commands.export_seg)

    mdl = sub.add_parser("models", help="list, show or register models")
    mdl_sub = mdl.add_subparsers(dest="models_command")
    mdl.set_defaults(handler=commands.models_list)
    mdl_sub.add_parser("list", help="list registered models").set_defaults(handler=commands.models_list)
    show = mdl_sub.add_parser("show", help="print one model's manifest")
    show.add_argument("name")
    show.set_defaults(handler=commands.models_show)
    add = mdl_sub.add_parser("add", help="register a manifest (+ weights) in the user model folder")
    add.add_argument("manifest")
    add.add_argument("--overwrite", action="store_true")
    add.set_defaults(handler=commands.models_add)

    trn = sub.add_parser("train", help="train a model on an MSD-style dataset folder")
    trn.add_argument("dataset", help="folder with dataset.json, imagesTr/, labelsTr/")
    trn.add_argument("-o", "--output", required=True, help="folder for model.pt + manifest.json")
    trn.add_argument("--name", required=True, help="model name for the manifest")
    trn.add_argument("--iterations", type=int, default=600)
    trn.add_argument("--batch-size", type=int, default=2)
    trn.add_argument("--crop", type=_int_triple, default=(64, 64, 32), help="training crop, e.g. 64,64,32")
    trn.add_argument("--roi", type=_int_triple, default=(64, 64, 64), help="inference window, e.g. 96")
    trn.add_argument("--spacing", type=_triple, default=(2.5, 2.5, 2.5), help="model spacing in mm")
    trn.add_argument("--family", choices=FAMILIES, default="swin_unetr", help="segmenter family (default swin_unetr)")
    trn.add_argument("--loss", choices=LOSSES, default=None,
                     help="dicece, or compound (CE + Dice + 0.8 RS-Tversky); default: the family's")
    trn.add_argument("--recipe", choices=("default", "reference"), default="default",
                     help="default: AdamW + one-cycle at --lr; reference: the family's published recipe")
    trn.add_argument("--lr", type=float, default=1e-3)
    trn.add_argument("--validate-every", type=int, default=100)
    trn.add_argument("--validation-cases", type=int, default=2)
    trn.add_argument("--window", type=_triple, default=None, help="HU window low,high (default -300,700)")
    trn.add_argument("--intensity", choices=("window", "zscore", "none"), default="window",
                     help="window (CT HU, default), or zscore per channel (e.g. PET + CT)")
    trn.add_argument("--seed", type=int, default=0)
    trn.add_argument("--keep-largest", default="all",
                     help="labels whose largest connected component alone is kept at inference: all (default), "
                          "none, or values such as 1 (a primary tumour is one object, its nodes are several)")
    trn.add_argument("--crop-centres", choices=("foreground", "classes"), default="foreground",
                     help="foreground (default): 2 of 3 crops centred on any structure; classes: on each label and "
                          "the background equally often (small structures seen as often as large ones)")
    trn.add_argument("--mirror-axes", type=_mirror_axes, default=(),
                     help="model-grid axes (RAS: 0 = left-right) along which the anatomy is symmetric, e.g. 0: "
                          "training crops are flipped along them at random and the model mirrors at inference "
                          "(window families average the flips, 2x per axis; sampling families mirror alternate "
                          "ensemble members, at no cost); default none")
    trn.add_argument("--soft-labels", action="store_true",
                     help="labels reach the model grid as per-class fractions (one-hot, resampled trilinearly), not "
                          "by nearest neighbour: a model coarser than its source learns where a boundary lies "
                          "within a voxel (families whose loss takes them: diffusion)")
    trn.add_argument("--init", default=None, help="start from this checkpoint (same network settings)")
    trn.add_argument("--save-fp16", action="store_true", help="store the weights as float16 (half the size)")
    trn.add_argument("--device", default="auto")
    for family in all_families():
        family.add_train_arguments(trn.add_argument_group(f"{family.title} network ({family.name})"))
    trn.set_defaults(handler=commands.train)

    ev = sub.add_parser("evaluate", help="Dice and HD95 of predicted masks against reference labels")
    ev.add_argument("--pred", required=True, help="tessera segment output folder, or a folder of masks")
    ev.add_argument("--truth", required=True, help="folder of reference label maps (<case>.nii.gz)")
    ev.add_argument("--labels", default=None, help="dataset.json or labels JSON for label names")
    ev.add_argument("-o", "--output", default=None, help="write metrics JSON here (default PRED/metrics.json)")
    ev.set_defaults(handler=commands.evaluate)

    gen = sub.add_parser("sample-data", help="generate the synthetic phantom dataset")
    gen.add_argument("-o", "--output", required=True)
    gen.add_argument("--train", type=int, default=20)
    gen.add_argument("--test", type=int, default=4)
    gen.add_argument("--first-seed", type=int, default=0)
    gen.add_argument("--kind", choices=("ct", "hnc"), default="ct",
                     help="ct: abdominal CT phantoms (default); hnc: head-and-neck PET/CT with GTVp/GTVn")
    gen.set_defaults(handler=commands.sample_data)

    srv = sub.add_parser("serve", help="run the REST service (FastAPI on uvicorn) with its job workers")
    srv.add_argument("--host", default=None, help="address to bind (default 127.0.0.1)")
    srv.add_argument("--port", type=int, default=None, help="port (default 8000)")
    srv.add_argument("--data-dir", default=None, help="job database, uploads and results (default ./tessera-data)")
    srv.add_argument("--config", default=None, help="a TOML settings file (also $TESSERA_CONFIG)")
    srv.add_argument("--model", default=None, help="default model for jobs that name none")
    srv.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N")
    srv.add_argument("--concurrency", type=int, default=None, help="jobs at once (default: one per GPU, else one)")
    srv.add_argument("--no-auth", action="store_true", help="no API keys (refused unless bound to loopback)")
    srv.add_argument("--executor", choices=("local", "ray"), default=None,
                     help="local (default): worker processes here; ray: each job's case runs on a Ray actor "
                          "(extra 'ray'), the queue and results stay in this server's SQLite")
    srv.add_argument("--ray-address", default=None, help="the Ray cluster's address for --executor ray")
    srv.set_defaults(handler=commands.serve)

    keys = sub.add_parser("keys", help="API keys of the REST service")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    for name, helptext in (("create", "make a key (printed once, alone on the last line)"),
                           ("list", "the keys (never the secrets)"), ("revoke", "revoke a key by name or id")):
        cmd = keys_sub.add_parser(name, help=helptext)
        cmd.add_argument("--data-dir", required=True, help="the service's data directory")
        if name == "create":
            cmd.add_argument("--name", required=True, help="who or what the key is for")
        if name == "revoke":
            cmd.add_argument("key", help="the key's name or id")
        cmd.set_defaults(handler=getattr(commands, f"keys_{name}"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    commands.configure_logging(verbose=args.verbose)
    try:
        return int(args.handler(args))
    except UsageError as exc:
        logging.getLogger("tessera").error("%s", exc)
        return EXIT_USAGE
    except TesseraError as exc:
        logging.getLogger("tessera").error("%s", exc)
        return EXIT_USAGE if exc.code in USAGE_CODES else EXIT_FAILED
    except KeyboardInterrupt:
        logging.getLogger("tessera").error("interrupted")
        return 130
    except Exception as exc:  # a bug: one line on the terminal, the traceback only with --verbose
        logging.getLogger("tessera").debug("internal error", exc_info=True)
        logging.getLogger("tessera").error("INTERNAL_ERROR: %s: %s (run with -v for details)", type(exc).__name__, exc)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
