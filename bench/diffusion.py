"""What one PET/CT case costs the diffusion family: seconds and network forwards (steps x windows x members).

No diffusion demo model is trained yet, so the network is randomly initialised at the family's default settings
(DiffusionModelUNet channels 16, 32, 64, attention at the last level): the masks mean nothing, the cost is real.
One head-and-neck PET/CT phantom from sample_data/hnc/imagesTs goes through the whole pipeline
(``segment_volume``: preprocessing, sampling, the way back to the source grid) at the CPU budget (the manifest's
cpu_steps / cpu_members) and, on a GPU, at the full one. Prints JSON.

    python bench/diffusion.py [--device cpu|cuda] [--roi 64] [--output bench/results/diffusion_cpu-2core.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import emit  # noqa: E402

from models.manifest import Channel, file_sha256, load_manifest, manifest_from_dict  # noqa: E402
from models.networks import build_network  # noqa: E402
from pipelines.inference import Predictor  # noqa: E402
from pipelines.ingestion.reading import read_case  # noqa: E402
from pipelines.segment import segment_volume  # noqa: E402

CASE = Path(__file__).resolve().parent.parent / "sample_data" / "hnc" / "imagesTs" / "hnc_016"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--roi", type=int, default=64)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    data: dict[str, Any] = {
        "name": "diffusion-bench", "family": "diffusion",
        "channels": [{"name": "CT", "modality": "CT"}, {"name": "PT", "modality": "PT"}],
        "labels": [{"value": 1, "name": "GTVp"}, {"value": 2, "name": "GTVn"}],
        "preprocessing": {"orientation": "RAS", "spacing": [3.0, 3.0, 3.0], "intensity": {"kind": "zscore"}},
        "inference": {"roi_size": [args.roi] * 3, "overlap": 0.25, "sw_batch_size": 2},
        "weights": {"path": "model.pt"},
    }
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        torch.save(build_network(manifest_from_dict(data)).state_dict(), Path(folder) / "model.pt")
        data["weights"]["sha256"] = file_sha256(Path(folder) / "model.pt")
        (Path(folder) / "manifest.json").write_text(json.dumps(data))
        manifest = load_manifest(Path(folder) / "manifest.json")
        predictor = Predictor(manifest, device=args.device)
        channels = (Channel("CT", "CT"), Channel("PT", "PT"))
        volume = read_case([Path(f"{CASE}_0000.nii.gz"), Path(f"{CASE}_0001.nii.gz")], channels, "hnc_016").volume
        start = time.perf_counter()
        result = segment_volume(volume, predictor)
        seconds = time.perf_counter() - start
    runtime = predictor.last_runtime
    sampler = runtime["sampler"]
    row = {
        "benchmark": "diffusion family: one PET/CT case through segment_volume (random weights: cost only)",
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.platform(),
        "case": "sample_data/hnc/imagesTs/hnc_016", "source_shape": list(volume.spatial_shape),
        "model_shape": list(result.mapping.model_shape), "roi": [args.roi] * 3,
        "steps": sampler["steps"], "members": sampler["members"], "forwards": runtime["forwards"],
        "windows_per_step": runtime["forwards"] // (sampler["steps"] * sampler["members"]),
        "seconds": round(seconds, 2), "stage_seconds": result.timer.seconds, "warnings": result.warnings,
    }
    emit(row, args.output)


if __name__ == "__main__":
    main()
