"""What a perfect mask on a model grid scores on the source grid: the ceiling the model grid and the way back set.

Each reference label map is taken to the model grid as training takes it (``training_transforms``: orientation,
then ``Spacingd`` with nearest neighbour for labels), made one-hot (a perfect, fully confident prediction), and
brought back to the label's own grid by the pipeline's way back (``GridMapping.labels_to_source``: trilinear
class scores, argmax), then scored against the reference with ``tessera evaluate``'s Dice. The gap to 1 is what no
model on that grid can win back through this way back; the volume ratio says whether masks come back smaller.

``--to-model linear`` takes the labels to the model grid as soft labels instead: each class's indicator resampled
trilinearly (the fraction a model trained on such targets would learn), brought back the same way. The gap
between the two says how much of the ceiling is the nearest-neighbour training labels rather than the grid.

    python bench/grid_ceiling.py [--labels sample_data/hnc/labelsTs] [--spacings 4,3,2.5]
        [--to-model nearest|linear] [--output bench/results/grid_ceiling_cpu.json]
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from monai.data import MetaTensor  # noqa: E402
from monai.transforms import Compose  # noqa: E402
from report import emit  # noqa: E402

from models.manifest import IntensitySpec, PreprocessingSpec  # noqa: E402
from pipelines.evaluation import score_case  # noqa: E402
from pipelines.ingestion.nifti import read_nifti  # noqa: E402
from pipelines.phantoms_hnc import HNC_LABELS  # noqa: E402
from pipelines.preprocessing import prepare, training_transforms  # noqa: E402


def round_trip(path: Path, spacing: float, names: dict[int, str], to_model: str = "nearest") -> dict[str, Any]:
    """One label map to the model grid (``nearest``: as training takes labels; ``linear``: soft labels, each
    class's indicator resampled trilinearly) and back (the pipeline's way back)."""
    volume = read_nifti(path)
    spec = PreprocessingSpec(orientation="RAS", spacing=(spacing, spacing, spacing),
                             intensity=IntensitySpec(kind="none"))
    reference = np.asarray(volume.array, dtype=np.uint8)
    source = MetaTensor(torch.as_tensor(reference[None], dtype=torch.float32),
                        affine=torch.as_tensor(volume.affine))
    soft_classes = len(names) + 1 if to_model == "linear" else None
    on_model = Compose(training_transforms(spec, ("image", "label"), soft_classes))({"image": source, "label": source})
    on_grid = torch.as_tensor(on_model["label"]).float()
    mapping = prepare(volume, spec).mapping
    if tuple(on_grid.shape[1:]) != mapping.model_shape:
        raise SystemExit(f"{path.name}: training grid {tuple(on_grid.shape[1:])} is not the inference grid "
                         f"{mapping.model_shape}")
    if soft_classes is None:  # nearest-neighbour labels, made a perfect one-hot prediction
        on_grid = torch.nn.functional.one_hot(on_grid[0].round().long(), len(names) + 1).permute(3, 0, 1, 2).float()
    back = mapping.labels_to_source(on_grid).numpy().astype(np.uint8)
    scores = score_case(back, reference, names, volume.spacing)
    return {
        "dice": {score.name: round(score.dice, 4) for score in scores},
        "voxels_back_vs_reference": {names[v]: [int((back == v).sum()), int((reference == v).sum())] for v in names},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", default=str(ROOT / "sample_data" / "hnc" / "labelsTs"))
    parser.add_argument("--spacings", default="4,3,2.5", help="isotropic model spacings in mm")
    parser.add_argument("--to-model", choices=("nearest", "linear"), default="nearest",
                        help="labels to the model grid by nearest neighbour (as training) or as soft labels")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    names = dict(HNC_LABELS)
    paths = sorted(Path(args.labels).glob("*.nii.gz"))
    results: dict[str, Any] = {}
    for spacing in (float(s) for s in args.spacings.split(",")):
        cases = {p.name.removesuffix(".nii.gz"): round_trip(p, spacing, names, args.to_model) for p in paths}
        per_label = {name: round(float(np.mean([c["dice"][name] for c in cases.values()])), 4)
                     for name in names.values()}
        results[f"{spacing:g} mm"] = {"mean_dice": round(float(np.mean(list(per_label.values()))), 4),
                                      "dice": per_label, "cases": cases}
    emit({"benchmark": "grid_ceiling: a perfect model-grid mask through the way back",
          "labels": args.labels.removeprefix(f"{ROOT}/"), "to_model": args.to_model,
          "spacings": results, "platform": platform.platform()}, args.output)


if __name__ == "__main__":
    main()
