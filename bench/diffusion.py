"""What one PET/CT case costs the diffusion family: seconds and network forwards (steps x windows x members).

The shipped demo model ``diffusion-hnc-phantom`` (or ``--model``) segments one held-out head-and-neck PET/CT
phantom (sample_data/hnc/imagesTs/hnc_016) through the whole pipeline (``segment_volume``: preprocessing,
sampling, the way back to the source grid) at the CPU budget (the manifest's cpu_steps / cpu_members) on the
CPU, at the full one on a GPU; ``--steps`` / ``--members`` set them. Prints JSON with the case's Dice too.

    python bench/diffusion.py [--device cpu|cuda] [--steps N --members N]
        [--output bench/results/diffusion_cpu-2core.json]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import emit  # noqa: E402

from models.registry import resolve_model  # noqa: E402
from pipelines.evaluation import score_case  # noqa: E402
from pipelines.inference import Predictor  # noqa: E402
from pipelines.ingestion.nifti import read_nifti  # noqa: E402
from pipelines.ingestion.reading import read_case  # noqa: E402
from pipelines.segment import segment_volume  # noqa: E402

CASE = Path(__file__).resolve().parent.parent / "sample_data" / "hnc" / "imagesTs" / "hnc_016"
TRUTH = Path(__file__).resolve().parent.parent / "sample_data" / "hnc" / "labelsTs" / "hnc_016.nii.gz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--model", default="diffusion-hnc-phantom")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--members", type=int, default=None)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    manifest = resolve_model(args.model)
    sampling = {k: v for k, v in (("steps", args.steps), ("members", args.members)) if v is not None}
    predictor = Predictor(manifest, device=args.device, sampling=sampling)
    channels = tuple(manifest.channels)
    volume = read_case([Path(f"{CASE}_0000.nii.gz"), Path(f"{CASE}_0001.nii.gz")], channels, "hnc_016").volume
    start = time.perf_counter()
    result = segment_volume(volume, predictor)
    seconds = time.perf_counter() - start
    truth = read_nifti(TRUTH).array.astype(np.uint8)
    scores = score_case(result.labels, truth, manifest.label_names(), volume.spacing)
    runtime = result.runtime
    sampler = runtime["sampler"]
    row = {
        "benchmark": "diffusion family: one PET/CT case through segment_volume",
        "model": f"{manifest.name} {manifest.version}",
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.platform(),
        "case": "sample_data/hnc/imagesTs/hnc_016", "source_shape": list(volume.spatial_shape),
        "model_shape": list(result.mapping.model_shape), "roi": list(manifest.inference.roi_size),
        "steps": sampler["steps"], "members": sampler["members"], "forwards": runtime["forwards"],
        "windows_per_step": runtime["forwards"] // (sampler["steps"] * sampler["members"]),
        "seconds": round(seconds, 2), "stage_seconds": result.timer.seconds, "warnings": result.warnings,
        "dice": {s.name: round(s.dice, 4) for s in scores},
    }
    emit(row, args.output)


if __name__ == "__main__":
    main()
