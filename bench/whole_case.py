"""The whole case, file to file: ``tessera segment`` against the standard MONAI recipe, each in its own process.

MONAI recipe (same network, same weights): LoadImaged -> EnsureChannelFirstd -> Orientationd -> Spacingd ->
ScaleIntensityRanged -> sliding_window_inference -> softmax -> Invertd -> argmax -> SaveImaged (see
``bench/pipeline_stages.py``), plus MONAI's KeepLargestConnectedComponent on the model's labels for the pairing
with Tessera's default (which keeps the largest component of those labels). Each run is a fresh process (started
through a small launcher, so it does not inherit this process's memory high-water mark), ``--repeats`` times:
the shortest wall seconds (imports and model loading included, as a user waits for them) and the largest peak
RSS (``wait4``'s ru_maxrss).

Cases: ``make_phantom(9200, orientation="LPS", spacing=(0.4, 0.4, 0.7))`` (489x378x234) and the same phantom at
half and double the voxels (spacing scaled by 2^(1/3)); Tessera's own stage timings from its report. Then a
folder of 6 such cases (seeds 9200-9205): ``tessera segment FOLDER`` sequential (``--no-overlap``) vs staged
(``--lanes 1``: the next case read and the previous one written while one is predicted) vs lanes (the CPU
default, ``--lanes 2``: two cases at once, each on its own thread with half the torch threads), the three
alternated in each round.

    python bench/whole_case.py [--device cpu] [--sizes 0.5,1,2] [--folder 6] [--output bench/results/...json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import emit  # noqa: E402

BASE_SEED, BASE_SPACING = 9200, (0.4, 0.4, 0.7)


# A small launcher between this process and the measured one: a child forked straight from here would inherit
# this process's memory high-water mark (Linux copies it with the address space at fork and keeps it across exec),
# and this process has just generated a phantom of several GiB.
LAUNCHER = """
import json, os, subprocess, sys, time
started = time.perf_counter()
child = subprocess.Popen(sys.argv[2:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(child.pid, 0)
json.dump({"rc": os.waitstatus_to_exitcode(status), "wall_s": time.perf_counter() - started,
           "maxrss_kib": usage.ru_maxrss, "cpu_s": usage.ru_utime + usage.ru_stime}, open(sys.argv[1], "w"))
"""


def run_child(command: list[str], repeats: int = 1) -> dict[str, Any]:
    """Run ``command`` in its own process ``repeats`` times: the shortest wall seconds, the largest peak
    resident memory (MiB, ``wait4``'s ru_maxrss) of the runs, and the CPU seconds (user + system) of the fastest
    run with the cores they kept busy on average."""
    walls, peaks, cpus = [], [], []
    with tempfile.TemporaryDirectory() as scratch:
        record = Path(scratch) / "usage.json"
        for _ in range(repeats):
            run = subprocess.run([sys.executable, "-c", LAUNCHER, str(record), *command], cwd=ROOT,
                                 stderr=subprocess.PIPE, text=True)
            usage = json.loads(record.read_text())
            if run.returncode != 0 or usage["rc"] != 0:
                raise SystemExit(f"{' '.join(command)} failed ({usage['rc']}):\n{run.stderr[-3000:]}")
            walls.append(usage["wall_s"])
            peaks.append(usage["maxrss_kib"] / 1024)
            cpus.append(usage["cpu_s"])
    fastest = walls.index(min(walls))
    return {"wall_s": round(min(walls), 2), "walls_s": [round(w, 2) for w in walls],
            "peak_rss_mib": round(max(peaks), 1), "cpu_s": round(cpus[fastest], 2),
            "cores_busy": round(cpus[fastest] / walls[fastest], 2)}


def batch_seconds(out: Path) -> float:
    """The batch alone, after the serial start (imports, model loading): from the run log's line that names the
    model and the cases to its last line (the tally)."""
    from datetime import datetime

    lines = (out / "tessera.log").read_text().splitlines()
    first = next(line for line in lines if " case(s) -> " in line)
    last = [line for line in lines if " succeeded, " in line][-1]
    stamp = lambda line: datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")  # noqa: E731
    return round((stamp(last) - stamp(first)).total_seconds(), 2)


def fastest_of(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Single runs of one command merged as :func:`run_child` merges its repeats."""
    fastest = min(rows, key=lambda row: row["wall_s"])
    return {**fastest, "walls_s": [row["wall_s"] for row in rows],
            "peak_rss_mib": max(row["peak_rss_mib"] for row in rows),
            "batch_s": min(row["batch_s"] for row in rows), "batches_s": [row["batch_s"] for row in rows]}


def write_case(folder: Path, seed: int, scale: float) -> Path:
    from pipelines.phantoms import make_phantom

    phantom = make_phantom(seed, orientation="LPS", spacing=tuple(s * scale for s in BASE_SPACING))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"case_{seed}.nii.gz"
    nib.save(phantom.image, path)
    return path


def tessera(case: Path, out: Path, device: str, keep_largest: bool, extra: tuple[str, ...] = (),
            repeats: int = 1) -> dict[str, Any]:
    command = [sys.executable, "-m", "app.cli.main", "segment", str(case), "-o", str(out), "--format", "nifti",
               "--device", device, "--overwrite", *extra] + ([] if keep_largest else ["--no-keep-largest"])
    row = run_child(command, repeats)
    if case.is_file():
        report = json.loads((out / case.name.removesuffix(".nii.gz") / "report.json").read_text())
        row["stages_s"] = report["timings_s"]
    return row


def monai(case: Path, out: Path, device: str, keep_largest: bool, repeats: int = 1) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--monai-case", str(case), "--monai-out", str(out),
               "--device", device] + (["--keep-largest"] if keep_largest else [])
    return run_child(command, repeats)


def monai_case(case: Path, out: Path, device: str, keep_largest: bool) -> None:
    """The MONAI recipe on one file, as a user of MONAI writes it (the child process of :func:`monai`)."""
    import torch
    from monai.transforms import KeepLargestConnectedComponent, SaveImage
    from pipeline_stages import monai_recipe

    from models.registry import resolve_model
    from pipelines.inference import Predictor

    predictor = Predictor(resolve_model(None), device=device)
    labels = monai_recipe(predictor)(case)
    if keep_largest:
        applied = list(predictor.manifest.keep_largest_component)
        labels = np.asarray(KeepLargestConnectedComponent(applied_labels=applied, independent=True, connectivity=3)(
            torch.as_tensor(labels[None].astype(np.int32)))[0]).astype(np.uint8)
    source: Any = nib.load(case)
    SaveImage(output_dir=str(out), output_postfix="seg", separate_folder=False, print_log=False, dtype=np.uint8)(
        torch.as_tensor(labels[None]), meta_data={"affine": source.affine, "original_affine": source.affine,
                                                   "filename_or_obj": str(case)})


def labels_of(path: Path) -> np.ndarray:
    image: Any = nib.load(path)
    return np.asarray(image.dataobj)


def compare_case(case: Path, work: Path, device: str, repeats: int) -> dict[str, Any]:
    image: Any = nib.load(case)
    shape = image.shape
    row: dict[str, Any] = {"shape": list(shape), "voxels": int(np.prod(shape))}
    pairs = {}
    for keep in (True, False):
        key = "keep_largest" if keep else "plain"
        ours_dir, theirs_dir = work / f"tessera_{key}", work / f"monai_{key}"
        ours = tessera(case, ours_dir, device, keep, repeats=repeats)
        theirs = monai(case, theirs_dir, device, keep, repeats)
        a = labels_of(ours_dir / case.name.removesuffix(".nii.gz") / "mask.nii.gz")
        b = labels_of(theirs_dir / f"{case.name.removesuffix('.nii.gz')}_seg.nii.gz")
        pairs[key] = {
            "tessera": ours, "monai": theirs,
            "wall_ratio": round(ours["wall_s"] / theirs["wall_s"], 3),
            "rss_ratio": round(ours["peak_rss_mib"] / theirs["peak_rss_mib"], 3),
            "identical_labels": round(float((a == b).mean()), 6) if a.shape == b.shape else None,
        }
        shutil.rmtree(ours_dir, ignore_errors=True)
        shutil.rmtree(theirs_dir, ignore_errors=True)
    row.update(pairs)
    stages = pairs["keep_largest"]["tessera"]["stages_s"]
    row["tessera_case_s"] = stages["total"]
    row["tessera_stages_other_than_predict_s"] = round(stages["total"] - stages["predict"], 3)
    return row


def linearity(sizes: dict[str, Any]) -> dict[str, Any]:
    """How Tessera's cost grows with the source voxels. The phantom's body is the same at every size (only the
    voxels are finer), so the model grid, and the prediction, stay the same: what grows is the work on the
    source grid (read, preprocess, way back, postprocess, write). Per size, each stage's shorter time of the
    two runs (plain and keep-largest; postprocess from the keep-largest run), per megavoxel, and the spread."""
    per_megavoxel = {}
    for name, row in sizes.items():
        plain, kept = row["plain"]["tessera"]["stages_s"], row["keep_largest"]["tessera"]["stages_s"]
        stages = {stage: min(plain[stage], kept[stage]) for stage in ("read", "preprocess", "to_source_grid", "write")}
        stages["postprocess"] = kept["postprocess"]
        per_megavoxel[name] = round(sum(stages.values()) / row["voxels"] * 1e6, 4)
    low, high = min(per_megavoxel.values()), max(per_megavoxel.values())
    return {"source_grid_seconds_per_megavoxel": per_megavoxel, "spread": round(high / low - 1, 3),
            "predict_s": {name: row["keep_largest"]["tessera"]["stages_s"]["predict"] for name, row in sizes.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", default="0.5,1,2",
                        help="voxel counts relative to the 489x378x234 phantom ('' for the folder run only)")
    parser.add_argument("--folder", type=int, default=6,
                        help="cases in the sequential vs staged vs lanes runs (0: skip)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each process (shortest wall reported)")
    parser.add_argument("--output", default=None)
    parser.add_argument("--monai-case", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--monai-out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--keep-largest", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.monai_case:
        monai_case(Path(args.monai_case), Path(args.monai_out), args.device, args.keep_largest)
        return
    result: dict[str, Any] = {"benchmark": "whole_case", "device": args.device, "platform": platform.platform(),
                              "cpus": os.cpu_count(), "phantom": f"make_phantom({BASE_SEED}, 'LPS', {BASE_SPACING})"}
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        sizes: dict[str, Any] = {}
        for factor in (float(f) for f in args.sizes.split(",") if f.strip()):
            case = write_case(work / f"size_{factor}", BASE_SEED, (1.0 / factor) ** (1 / 3))
            sizes[f"{factor:g}x"] = compare_case(case, work, args.device, args.repeats)
            print(json.dumps({f"{factor:g}x": sizes[f"{factor:g}x"]}), file=sys.stderr)
        result["sizes"] = sizes
        if sizes:
            result["linearity"] = linearity(sizes)
        if args.folder:
            folder = work / "folder"
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(os.cpu_count()) as pool:  # generating a phantom takes a minute
                list(pool.map(write_case, [folder] * args.folder, range(BASE_SEED, BASE_SEED + args.folder),
                              [1.0] * args.folder))
            modes = {"sequential": ("--no-overlap",), "staged": ("--lanes", "1"), "lanes": ("--lanes", "2")}
            rounds: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
            for _ in range(args.repeats):  # alternated, so that the machine's noise falls on all three alike
                for mode, extra in modes.items():
                    out = work / f"out_{mode}"
                    shutil.rmtree(out, ignore_errors=True)  # a fresh run log each round
                    rounds[mode].append({**tessera(folder, out, args.device, True, extra),
                                         "batch_s": batch_seconds(out)})
            runs: dict[str, Any] = {mode: fastest_of(rows) for mode, rows in rounds.items()}
            for mode in ("staged", "lanes"):  # whole processes, and the batches alone (after the serial start)
                runs[f"{mode}_throughput_ratio"] = round(runs["sequential"]["wall_s"] / runs[mode]["wall_s"], 3)
                runs[f"{mode}_batch_ratio"] = round(runs["sequential"]["batch_s"] / runs[mode]["batch_s"], 3)
            names = [p.name.removesuffix(".nii.gz") for p in sorted(folder.iterdir())]
            runs["masks_equal"] = all(np.array_equal(labels_of(work / "out_sequential" / c / "mask.nii.gz"),
                                                     labels_of(work / f"out_{mode}" / c / "mask.nii.gz"))
                                      for mode in ("staged", "lanes") for c in names)
            result["folder"] = {"cases": args.folder, **runs}
    emit(result, args.output)


if __name__ == "__main__":
    main()
