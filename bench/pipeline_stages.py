"""Tessera's case pipeline vs the standard MONAI recipe, same model, same cases, one process.

MONAI recipe: LoadImaged -> EnsureChannelFirstd -> Orientationd -> Spacingd -> ScaleIntensityRanged ->
sliding_window_inference -> Invertd (back to the source grid) -> argmax. Prints JSON: seconds per case
for each, their ratio, and how many voxels' labels agree (before keep-largest-component).

    python bench/pipeline_stages.py [--cases sample_data/imagesTs] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    Invertd,
    LoadImaged,
    Orientationd,
    ScaleIntensityRanged,
    Spacingd,
)

from models.registry import resolve_model
from pipelines.inference import Predictor
from pipelines.ingestion.nifti import read_nifti
from pipelines.segment import segment_volume


def monai_recipe(predictor: Predictor):
    manifest = predictor.manifest
    pre, window = manifest.preprocessing, manifest.preprocessing.intensity
    transforms = Compose([
        LoadImaged(keys="image"),
        EnsureChannelFirstd(keys="image"),
        Orientationd(keys="image", axcodes=pre.orientation),
        Spacingd(keys="image", pixdim=pre.spacing or (1.0, 1.0, 1.0), mode="bilinear"),
        ScaleIntensityRanged(keys="image", a_min=window.a_min, a_max=window.a_max, b_min=window.b_min,
                             b_max=window.b_max, clip=window.clip),
    ])
    invert = Invertd(keys="pred", transform=transforms, orig_keys="image", nearest_interp=False)

    @torch.no_grad()
    def run(path: Path) -> np.ndarray:
        data = transforms({"image": str(path)})
        logits = sliding_window_inference(data["image"][None], manifest.inference.roi_size,
                                          manifest.inference.sw_batch_size, predictor.network,
                                          overlap=manifest.inference.overlap, mode=manifest.inference.mode)
        probabilities = torch.softmax(logits[0], dim=0)
        data["pred"] = MetaTensor(probabilities, meta=data["image"].meta,
                                  applied_operations=data["image"].applied_operations)
        inverted = invert(data)["pred"]
        return torch.argmax(torch.as_tensor(inverted), dim=0).numpy().astype(np.uint8)

    return run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default="sample_data/imagesTs")
    parser.add_argument("--model", default=None)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    predictor = Predictor(resolve_model(args.model), device="auto")
    peer = monai_recipe(predictor)
    cases = sorted(Path(args.cases).glob("*.nii*"))
    rows = []
    for path in cases:
        tessera_s, monai_s = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            ours = segment_volume(read_nifti(path), predictor, keep_largest=False)
            tessera_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            theirs = peer(path)
            monai_s.append(time.perf_counter() - start)
        same_grid = theirs.shape == ours.labels.shape
        rows.append({
            "case": path.name,
            "shape": list(ours.volume.spatial_shape),
            "tessera_s": round(min(tessera_s), 3),
            "monai_s": round(min(monai_s), 3),
            "tessera_stages_s": ours.timer.seconds,
            "monai_same_grid": same_grid,
            "identical_labels": round(float((theirs == ours.labels).mean()), 6) if same_grid else None,
        })
    total_t, total_m = sum(r["tessera_s"] for r in rows), sum(r["monai_s"] for r in rows)
    print(json.dumps({
        "benchmark": "pipeline_stages",
        "device": str(predictor.device),
        "model": predictor.manifest.name,
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "cases": rows,
        "tessera_total_s": round(total_t, 3),
        "monai_total_s": round(total_m, 3),
        "time_ratio_tessera_to_monai": round(total_t / total_m, 3) if total_m else None,
    }, indent=2))


if __name__ == "__main__":
    main()
