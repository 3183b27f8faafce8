"""DICOM series reading: Tessera (read_study + load_volume) vs SimpleITK's ImageSeriesReader, one process.

Generates once (cached under ``--workdir``) a CT-like series of ``--size`` x ``--size`` x ``--slices``
int16 images, written by ``pipelines.phantom_dicom.write_ct_series`` uncompressed (explicit VR little
endian) and as JPEG 2000 lossless. The texture is a small phantom (pipelines.phantoms) upsampled, plus
noise, so compression ratios are CT-like. Then times both readers side by side (best of ``--repeats``,
runs interleaved) and prints JSON: seconds for each, the ratio tessera/sitk, voxel equality after
matching axes, affine agreement, platform. Progress goes to stderr; stdout is JSON only.

SimpleITK is timed for ``GetGDCMSeriesFileNames`` + ``Execute`` (its result is an ``sitk.Image``; the
NumPy conversion is reported separately); Tessera for ``read_study`` + ``load_volume`` (a float32
NumPy array of modality values).

    python bench/dicom_read.py [--size 512] [--slices 400] [--repeats 3] [--workdir /tmp/tessera-bench-dicom]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import SimpleITK as sitk  # noqa: N813 (its usual name)
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless
from scipy import ndimage

from pipelines.ingestion.dicom.reader import load_volume, read_study
from pipelines.phantom_dicom import write_ct_series
from pipelines.phantoms import make_phantom

SYNTAXES = {"explicit": ExplicitVRLittleEndian, "j2k": JPEG2000Lossless}
GENERATOR_VERSION = 1
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def synthetic_ct(size: int, slices: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``[i, j, k]`` int16 HU and its RAS affine: a 4 mm phantom upsampled to 360 mm FOV, 1.25 mm slices."""
    base = np.asarray(make_phantom(seed, orientation="LPS", spacing=(4.0, 4.0, 5.0)).image.dataobj, dtype=np.float32)
    rng = np.random.default_rng(seed)
    out = np.empty((size, size, slices), dtype=np.int16)
    zoom = (size / base.shape[0], size / base.shape[1])
    for k in range(slices):
        z = k * (base.shape[2] - 1) / max(slices - 1, 1)
        low = int(np.floor(z))
        high = min(low + 1, base.shape[2] - 1)
        plane = (1 - (z - low)) * base[:, :, low] + (z - low) * base[:, :, high]
        plane = ndimage.zoom(plane, zoom, order=1)[:size, :size]
        plane += rng.normal(0.0, 12.0, size=plane.shape).astype(np.float32)
        out[:, :, k] = np.clip(np.round(plane), -1024, 3071).astype(np.int16)
    in_plane = 360.0 / size
    lps = np.diag([in_plane, in_plane, 1.25, 1.0])
    lps[:3, 3] = [-180.0 + in_plane / 2, -200.0 + in_plane / 2, -300.0]
    return out, LPS_TO_RAS @ lps


def ensure_series(workdir: Path, size: int, slices: int, names: list[str]) -> dict[str, Path]:
    """The cached series folders, written where missing or incomplete."""
    root = workdir / f"ct_{size}x{size}x{slices}_v{GENERATOR_VERSION}"
    folders = {name: root / name for name in names}
    todo = []
    for name, folder in folders.items():
        marker = root / f"{name}.complete.json"
        if marker.exists() and json.loads(marker.read_text()).get("files") == slices:
            log(f"[dicom_read] using cached {folder}")
        else:
            todo.append(name)
    if not todo:
        return folders
    log(f"[dicom_read] generating a {size}x{size}x{slices} volume")
    array, affine = synthetic_ct(size, slices)
    for name in todo:
        folder = folders[name]
        if folder.exists():
            for stale in folder.iterdir():
                stale.unlink()
        started = time.perf_counter()
        step = max(slices // 10, 1)

        def progress(done: int, total: int, name: str = name, started: float = started, step: int = step) -> None:
            if done % step == 0 or done == total:
                log(f"[dicom_read] {name}: wrote {done}/{total} slices ({time.perf_counter() - started:.1f} s)")

        write_ct_series(array, affine, folder, transfer_syntax=SYNTAXES[name], uid_seed=f"bench-{name}",
                        series_description=f"bench {name}", progress=progress)
        (root / f"{name}.complete.json").write_text(json.dumps({"files": slices, "syntax": name}))
    return folders


def read_tessera(folder: Path) -> tuple[float, np.ndarray, np.ndarray]:
    started = time.perf_counter()
    study = read_study(folder)
    volume = load_volume(study.volumes[0])
    return time.perf_counter() - started, volume.array, volume.affine


def read_sitk(folder: Path) -> tuple[float, sitk.Image]:
    started = time.perf_counter()
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    image = reader.Execute()
    return time.perf_counter() - started, image


def sitk_affine(image: sitk.Image) -> np.ndarray:
    """Voxel ``[column, row, slice]`` -> RAS+ (SimpleITK's index order is x, y, z = column, row, slice)."""
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(image.GetDirection()).reshape(3, 3) * np.asarray(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    return LPS_TO_RAS @ lps


def compare(tessera: np.ndarray, tessera_affine: np.ndarray, image: sitk.Image) -> dict[str, Any]:
    started = time.perf_counter()
    array = sitk.GetArrayViewFromImage(image).transpose(2, 1, 0)  # [slice, row, col] -> [col, row, slice]
    to_numpy_s = time.perf_counter() - started
    affine = sitk_affine(image)
    same_grid = np.allclose(affine, tessera_affine, atol=1e-3)
    if not same_grid:  # e.g. slices in the other order: compare in the closest canonical orientation
        ours = nib.as_closest_canonical(nib.Nifti1Image(tessera, tessera_affine))
        theirs = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(array, dtype=np.float32), affine))
        tessera, tessera_affine = np.asarray(ours.dataobj), ours.affine
        array, affine = np.asarray(theirs.dataobj), theirs.affine
    shape_equal = tuple(tessera.shape) == tuple(array.shape)
    max_abs = float(np.max(np.abs(tessera - array.astype(np.float32)))) if shape_equal else None
    return {
        "sitk_pixel_type": image.GetPixelIDTypeAsString(),
        "sitk_get_array_view_s": round(to_numpy_s, 6),
        "same_axes_without_reorienting": bool(same_grid),
        "shape_equal": shape_equal,
        "max_abs_voxel_diff": max_abs,
        "voxels_identical": max_abs == 0.0,
        "affine_max_abs_diff_mm": float(np.max(np.abs(tessera_affine - affine))),
    }


def bench_syntax(name: str, folder: Path, repeats: int) -> dict[str, Any]:
    files = sorted(p for p in folder.iterdir() if p.suffix == ".dcm")
    tessera_runs, sitk_runs = [], []
    array = affine = None
    image = None
    for repeat in range(repeats):
        gc.collect()
        seconds, array, affine = read_tessera(folder)
        tessera_runs.append(seconds)
        gc.collect()
        seconds, image = read_sitk(folder)
        sitk_runs.append(seconds)
        log(f"[dicom_read] {name} run {repeat + 1}/{repeats}: tessera {tessera_runs[-1]:.3f} s, "
            f"sitk {sitk_runs[-1]:.3f} s")
    assert array is not None and affine is not None and image is not None
    best_tessera, best_sitk = min(tessera_runs), min(sitk_runs)
    return {
        "transfer_syntax": pydicom.uid.UID(SYNTAXES[name]).name,
        "files": len(files),
        "megabytes_on_disk": round(sum(p.stat().st_size for p in files) / 1e6, 2),
        "tessera_s": round(best_tessera, 4),
        "sitk_s": round(best_sitk, 4),
        "ratio_tessera_over_sitk": round(best_tessera / best_sitk, 3),
        "tessera_runs_s": [round(s, 4) for s in tessera_runs],
        "sitk_runs_s": [round(s, 4) for s in sitk_runs],
        **compare(array, affine, image),
    }


def platform_info() -> dict[str, Any]:
    import openjpeg

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "numpy": np.__version__,
        "pydicom": pydicom.__version__,
        "pylibjpeg_openjpeg": getattr(openjpeg, "__version__", "?"),
        "SimpleITK": sitk.Version_VersionString(),
        "sitk_threads": sitk.ProcessObject.GetGlobalDefaultNumberOfThreads(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/tessera-bench-dicom"))
    parser.add_argument("--size", type=int, default=512, help="rows = columns (default 512)")
    parser.add_argument("--slices", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--syntaxes", default=",".join(SYNTAXES), help=f"comma-separated of {', '.join(SYNTAXES)}")
    args = parser.parse_args(argv)
    names = [s.strip() for s in args.syntaxes.split(",") if s.strip()]
    unknown = [n for n in names if n not in SYNTAXES]
    if unknown or args.size < 32 or args.slices < 3 or args.repeats < 1:
        parser.error(f"unknown syntaxes {unknown}" if unknown else "need --size >= 32, --slices >= 3, --repeats >= 1")
    folders = ensure_series(args.workdir, args.size, args.slices, names)
    results = {name: bench_syntax(name, folders[name], args.repeats) for name in names}
    print(json.dumps({
        "benchmark": "dicom_read",
        "volume": {"rows": args.size, "columns": args.size, "slices": args.slices, "dtype": "int16",
                   "voxels": args.size * args.size * args.slices},
        "repeats": args.repeats,
        "timed": {"tessera": "read_study + load_volume (float32 ndarray)",
                  "sitk": "ImageSeriesReader GetGDCMSeriesFileNames + Execute (sitk.Image)"},
        "results": results,
        "platform": platform_info(),
    }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
