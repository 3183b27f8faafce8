"""PET/CT head-and-neck phantoms: the diffusion demo model against its baselines, same recipe, same budget.

Rows (every one scored through the whole pipeline, ``segment_case`` from the channel files to the mask on the CT
grid, then ``tessera evaluate``'s scoring):

- ``demo``: the shipped diffusion model (``--demo``), not retrained;
- at one smaller budget (``--ablation-iterations``, validated once at the end), each trained by the same
  ``tessera train`` command with the demo's recorded recipe (crop, spacing, intensity, seed, learning rate,
  keep-largest labels) on the demo's training set (regenerated: 64 phantoms of seeds 100+):
  ``diffusion PET+CT``, ``diffusion PET``, ``diffusion CT`` (one channel; PET resampled onto the CT grid, where
  the labels are, as inference resamples it), and ``swin_unetr PET+CT``, the paper's kind of baseline: a
  2-channel Swin-UNETR (feature size 12; its window rounded up to a multiple of 32, one crop side of 64).

Test cases: the committed held-out phantoms (sample_data/hnc/imagesTs) and freshly generated ones (seeds the
training never saw). Mean Dice over GTVp and GTVn per row; for the sampling rows the uncertainty AUROC (wrong vs
right voxels, pooled over the test cases). Prints JSON.

    python bench/hnc_models.py [--fresh 4] [--fresh-first-seed 1000] [--no-kept] [--rows all]
                               [--steps 50 --members 5] [--seed N] [--output FILE.json]

``--fresh-first-seed`` and ``--no-kept`` score the demo on other unseen sets alone (e.g. the validation phantoms,
seeds 500-507: ``--rows demo --fresh 8 --fresh-first-seed 500 --no-kept``).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import emit  # noqa: E402

from models.diffusion.predict import sampler_settings  # noqa: E402
from models.manifest import Channel, load_manifest  # noqa: E402
from pipelines.cases import CaseInput  # noqa: E402
from pipelines.evaluation_run import evaluate_folder  # noqa: E402
from pipelines.inference import Predictor  # noqa: E402
from pipelines.ingestion.reading import read_case  # noqa: E402
from pipelines.outputs import OutputOptions  # noqa: E402
from pipelines.phantoms import write_dataset_json  # noqa: E402
from pipelines.phantoms_hnc import HNC_LABELS, write_hnc_dataset  # noqa: E402
from pipelines.segment import segment_case  # noqa: E402

SAMPLE = ROOT / "sample_data" / "hnc"
PET_CT = (Channel("CT", "CT"), Channel("PET", "PT"))
FRESH_FIRST_SEED = 1000
COMMITTED_SEEDS = range(20)  # sample_data/hnc
TRAIN_FIRST_SEED, TRAIN_CASES = 100, 64  # the demo's training set (README: tessera sample-data --first-seed 100)
ROWS = ("demo", "swin_unetr PET+CT", "diffusion PET+CT", "diffusion PET", "diffusion CT")


def single_channel_dataset(source: Path, out: Path, channel: int, split: str) -> Path:
    """``source``'s ``split`` (CT + PET channel files) with one channel only, on the CT grid, as a single-file MSD
    dataset."""
    meta = json.loads((source / "dataset.json").read_text())
    splits: dict[str, list[dict[str, Any]]] = {"training": [], "test": []}
    folder = "Tr" if split == "training" else "Ts"
    (out / f"images{folder}").mkdir(parents=True, exist_ok=True)
    (out / f"labels{folder}").mkdir(parents=True, exist_ok=True)
    for entry in meta[split]:
        paths = [source / p for p in entry["image"]]
        case = paths[0].name.removesuffix("_0000.nii.gz")
        volume = read_case(paths, PET_CT, case).volume
        image = f"./images{folder}/{case}.nii.gz"
        nib.save(nib.Nifti1Image(volume.array[channel], volume.affine), out / image)
        label = f"./labels{folder}/{case}.nii.gz"
        (out / label).write_bytes((source / entry["label"]).read_bytes())
        splits[split].append({"image": image, "label": label})
    modality = ["CT", "PT"][channel]
    return write_dataset_json(out, f"TesseraHeadNeck{modality}", f"{meta['description']}; {modality} channel only",
                              [modality], HNC_LABELS, splits["training"], splits["test"], "bench.hnc_models", 0)


def train_like(demo: dict[str, Any], dataset: Path, out: Path, family: str, name: str,
               iterations: int | None = None) -> tuple[Path, float]:
    """``tessera train`` with the demo's recorded recipe (the family's own network settings for Swin-UNETR; its
    window rounded up to a multiple of 32 and one crop side of at least 64, which Swin-UNETR needs)."""
    config = demo["training"]["config"]
    roi, crop = list(config["roi_size"]), list(config["crop_size"])
    if family == "swin_unetr":
        roi = [-(-side // 32) * 32 for side in roi]
        crop[0] = max(crop[0], 64) if max(crop) < 64 else crop[0]
    args = [sys.executable, "-m", "app.cli.main", "train", str(dataset), "-o", str(out), "--name", name,
            "--family", family, "--iterations", str(iterations or config["iterations"]),
            "--batch-size", str(config["batch_size"]), "--crop", ",".join(map(str, crop)),
            "--roi", ",".join(map(str, roi)), "--spacing", ",".join(map(str, config["spacing"])),
            "--lr", str(config["learning_rate"]), "--seed", str(config["seed"]),
            "--validate-every", str(config["validate_every"] if iterations is None else iterations),
            "--validation-cases", str(config["validation_cases"]), "--intensity", config["intensity"]["kind"],
            "--keep-largest", ",".join(map(str, demo["keep_largest_component"])) or "none",
            "--crop-centres", config.get("crop_centres", "foreground"), "--device", "cpu",
            "--mirror-axes", ",".join(map(str, config.get("mirror_axes") or [])) or "none"]
    if family == "diffusion":
        network = demo["network"]
        args += ["--unet-channels", ",".join(map(str, network["channels"])),
                 "--attention-levels", ",".join("1" if a else "0" for a in network["attention_levels"]),
                 "--prediction", network["prediction_type"]]
    started = time.perf_counter()
    run = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"training {name} failed:\n{run.stderr[-3000:]}")
    return out / "manifest.json", time.perf_counter() - started


def score(manifest_path: Path, cases: list[CaseInput], truth: Path, out: Path,
          sampling: dict[str, int] | None = None) -> dict[str, Any]:
    predictor = Predictor(load_manifest(manifest_path), device="cpu")
    if sampling:
        predictor = predictor.with_sampling(sampling)
    started = time.perf_counter()
    for case in cases:
        result = segment_case(case, out, predictor, overwrite=True, outputs=OutputOptions(frozenset({"nifti"})))
        if result.status != "succeeded":
            raise SystemExit(f"{case.case_id}: {result.error_code}: {result.error_message}")
    seconds = time.perf_counter() - started
    metrics = evaluate_folder(out, truth)
    row: dict[str, Any] = {
        "mean_dice": metrics["mean_dice"],
        "dice": {name: values["dice"] for name, values in metrics["per_label"].items()},
        "hd95_mm": {name: values["hd95_mm"] for name, values in metrics["per_label"].items()},
        "cases": len(metrics["cases"]),
        "per_case_dice": {case: {name: values["dice"] for name, values in scores["labels"].items()}
                          for case, scores in metrics["cases"].items()},
        "seconds_per_case": round(seconds / len(cases), 1),
    }
    if "uncertainty" in metrics:
        row["uncertainty"] = metrics["uncertainty"]
    return row


def sampler_used(network: dict[str, Any], sampling: dict[str, int]) -> dict[str, int]:
    """The steps, members and seed the sampling rows ran with on the CPU (the run's, else the manifest's)."""
    settings, _ = sampler_settings(network, torch.device("cpu"), sampling)
    return {"steps": settings.steps, "members": settings.members, "seed": settings.seed}


def test_cases(dataset: Path) -> tuple[list[CaseInput], Path]:
    """The test split of ``dataset`` as cases (one file per channel) and the folder of their labels."""
    meta = json.loads((dataset / "dataset.json").read_text())
    cases = []
    for entry in meta["test"]:
        images = entry["image"] if isinstance(entry["image"], list) else [entry["image"]]
        label = Path(entry["label"]).name
        cases.append(CaseInput(label.removesuffix(".nii.gz"), tuple(dataset / p for p in images)))
    return cases, dataset / "labelsTs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", default=str(ROOT / "models" / "weights" / "diffusion-hnc-phantom"))
    parser.add_argument("--ablation-iterations", type=int, default=600)
    parser.add_argument("--fresh", type=int, default=4, help="freshly generated test phantoms (besides the 4 kept)")
    parser.add_argument("--fresh-first-seed", type=int, default=FRESH_FIRST_SEED,
                        help="the fresh phantoms' first seed (not 0-19, the committed ones, or 100-163, training)")
    parser.add_argument("--no-kept", action="store_true", help="score the fresh phantoms only")
    parser.add_argument("--rows", default="all", help=f"comma-separated subset of: {', '.join(ROWS)}")
    parser.add_argument("--steps", type=int, default=None,
                        help="sampling rows: DDIM steps (default: the model's CPU budget), e.g. 50 for its GPU default")
    parser.add_argument("--members", type=int, default=None, help="sampling rows: ensemble members (as --steps)")
    parser.add_argument("--seed", type=int, default=None,
                        help="sampling rows: the sampler's seed (default: the manifest's) to measure sampling noise")
    parser.add_argument("--work", default=None, help="keep datasets, models and masks here (default: a temp dir)")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    seen = set(COMMITTED_SEEDS) | set(range(TRAIN_FIRST_SEED, TRAIN_FIRST_SEED + TRAIN_CASES))
    if seen & set(range(args.fresh_first_seed, args.fresh_first_seed + args.fresh)):
        parser.error("--fresh-first-seed: those seeds are the committed phantoms (0-19) or the training set (100-163)")
    if args.no_kept and args.fresh <= 0:
        parser.error("--no-kept needs --fresh N (N > 0): there would be nothing to score")
    sampling = {key: value for key, value in (("steps", args.steps), ("members", args.members),
                                                             ("seed", args.seed)) if value is not None}
    rows = ROWS if args.rows == "all" else tuple(r.strip() for r in args.rows.split(","))
    demo_dir = Path(args.demo)
    demo = json.loads((demo_dir / "manifest.json").read_text())
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.work or scratch)
        work.mkdir(parents=True, exist_ok=True)
        fresh = write_hnc_dataset(work / "fresh_pet_ct", n_train=0, n_test=args.fresh, first_seed=args.fresh_first_seed)
        training = write_hnc_dataset(work / "train_pet_ct", n_train=TRAIN_CASES, n_test=0,
                                     first_seed=TRAIN_FIRST_SEED) if set(rows) - {"demo"} else work / "unused"
        pet_ct = {} if args.no_kept else {"kept": SAMPLE}
        if args.fresh > 0:
            pet_ct["fresh"] = fresh
        results: dict[str, Any] = {}
        for row in rows:
            family, channels = row.split(" ") if row != "demo" else ("diffusion", "PET+CT")
            if channels == "PET+CT":
                datasets, train_set = pet_ct, training
            else:
                channel = 1 if channels == "PET" else 0
                datasets = {split: single_channel_dataset(path, work / f"{split}_{channels}", channel, "test")
                            for split, path in pet_ct.items()}
                train_set = single_channel_dataset(training, work / f"train_{channels}", channel, "training")
            entry: dict[str, Any] = {"family": family, "channels": channels}
            if row == "demo":
                manifest_path = demo_dir / "manifest.json"
                entry["model"] = f"{demo['name']} {demo['version']}"
                entry["iterations"] = demo["training"]["config"]["iterations"]
                entry["training_seconds"] = demo["training"]["seconds"]
            else:
                name = row.replace(" ", "-").replace("+", "-").lower()
                iterations = args.ablation_iterations
                manifest_path, seconds = train_like(demo, train_set, work / "models" / name, family, name, iterations)
                entry["model"] = name
                entry["iterations"] = iterations or demo["training"]["config"]["iterations"]
                entry["training_seconds"] = round(seconds, 1)
            for split, dataset in datasets.items():
                cases, truth = test_cases(dataset)
                entry[split] = score(manifest_path, cases, truth, work / "masks" / row.replace(" ", "_") / split,
                                     sampling if family == "diffusion" else None)
            results[row] = entry
            print(json.dumps({row: entry}), file=sys.stderr)
    emit({
        "benchmark": "hnc_models",
        "demo": f"{demo['name']} {demo['version']}",
        "demo_weights_sha256": demo["weights"]["sha256"],
        "recipe": demo["training"]["config"],
        "sampling": {"requested": sampling or "the model's defaults on this machine",
                     "used": sampler_used(demo["network"], sampling)},
        "test_cases": {"kept": None if args.no_kept else "sample_data/hnc/imagesTs (4)",
                       "fresh": f"{args.fresh} phantoms of seeds {args.fresh_first_seed}+ (never seen in training)"
                       if args.fresh > 0 else None},
        "rows": results,
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
    }, args.output)


if __name__ == "__main__":
    main()
