"""``tessera evaluate``: score a folder of predicted masks against reference label maps."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.errors import InputError, TesseraError
from pipelines.evaluation import score_case
from pipelines.ingestion.nifti import case_id_for, is_nifti, read_nifti
from pipelines.volume import Volume

log = logging.getLogger(__name__)

GEOMETRY_TOLERANCE_MM = 1e-3


def _label_names(labels_file: Path | None, pred_root: Path, case_ids: list[str]) -> dict[int, str] | None:
    candidates = [labels_file] if labels_file else [pred_root / c / "labels.json" for c in case_ids]
    for path in candidates:
        if path and path.is_file():
            table = json.loads(path.read_text()).get("labels", {})
            return {int(k): str(v) for k, v in table.items() if int(k) != 0}
    return None


def _prediction_path(pred_root: Path, case_id: str) -> Path | None:
    for path in (pred_root / case_id / "mask.nii.gz", pred_root / f"{case_id}.nii.gz", pred_root / f"{case_id}.nii"):
        if path.is_file():
            return path
    return None


def _check_same_grid(prediction: Volume, reference: Volume) -> None:
    if prediction.spatial_shape != reference.spatial_shape:
        raise InputError(
            "GEOMETRY_MISMATCH",
            f"prediction grid {prediction.spatial_shape} differs from reference grid {reference.spatial_shape}",
        )
    error = float(np.abs(prediction.affine - reference.affine).max())
    if error > GEOMETRY_TOLERANCE_MM:
        raise InputError("GEOMETRY_MISMATCH", f"prediction affine differs from the reference by {error:.4g} mm")


def evaluate_folder(pred_root: Path, truth_root: Path, labels_file: Path | None = None) -> dict[str, Any]:
    """Per-case, per-label Dice and HD95; grids must match exactly (a flipped mask is an error, not a low score)."""
    truths = sorted(p for p in truth_root.iterdir() if is_nifti(p))
    case_ids = [case_id_for(p) for p in truths]
    names = _label_names(labels_file, pred_root, case_ids)
    cases: dict[str, Any] = {}
    missing, failed = [], []
    for truth_path, case_id in zip(truths, case_ids, strict=True):
        pred_path = _prediction_path(pred_root, case_id)
        if pred_path is None:
            missing.append(case_id)
            continue
        try:
            reference = read_nifti(truth_path)
            prediction = read_nifti(pred_path)
            _check_same_grid(prediction, reference)
            truth_labels = np.rint(reference.array).astype(np.int32)
            case_names = names or {int(v): f"label_{int(v)}" for v in np.unique(truth_labels) if v != 0}
            scores = score_case(np.rint(prediction.array).astype(np.int32), truth_labels, case_names,
                                reference.spacing)
        except TesseraError as exc:
            failed.append({"case": case_id, "code": exc.code, "message": exc.message})
            continue
        cases[case_id] = {
            "labels": {s.name: {"dice": round(s.dice, 5), "hd95_mm": None if s.hd95_mm is None else round(s.hd95_mm, 3)}
                       for s in scores},
            "mean_dice": round(float(np.mean([s.dice for s in scores])), 5),
        }
    per_label: dict[str, dict[str, float | None]] = {}
    label_order = list(next(iter(cases.values()))["labels"]) if cases else []
    for name in label_order:
        dices = [c["labels"][name]["dice"] for c in cases.values() if name in c["labels"]]
        hds = [c["labels"][name]["hd95_mm"] for c in cases.values()
               if c["labels"].get(name, {}).get("hd95_mm") is not None]
        per_label[name] = {"dice": round(float(np.mean(dices)), 5) if dices else None,
                           "hd95_mm": round(float(np.mean(hds)), 3) if hds else None}
    all_dice = [d["dice"] for c in cases.values() for d in c["labels"].values() if not math.isnan(d["dice"])]
    return {
        "prediction": str(pred_root),
        "reference": str(truth_root),
        "cases": cases,
        "per_label": per_label,
        "mean_dice": round(float(np.mean(all_dice)), 5) if all_dice else None,
        "missing_predictions": missing,
        "failed_cases": failed,
    }


def format_table(metrics: dict[str, Any]) -> str:
    lines = [f"{'label':<20} {'Dice':>8} {'HD95 mm':>9}"]
    for name, row in metrics["per_label"].items():
        dice = "-" if row["dice"] is None else f"{row['dice']:.4f}"
        hd = "-" if row["hd95_mm"] is None else f"{row['hd95_mm']:.2f}"
        lines.append(f"{name:<20} {dice:>8} {hd:>9}")
    mean = metrics["mean_dice"]
    lines.append(f"{'mean':<20} {'-' if mean is None else f'{mean:.4f}':>8}")
    lines.append(f"{len(metrics['cases'])} case(s) scored")
    for item in metrics["failed_cases"]:
        lines.append(f"FAILED {item['case']}: {item['code']}: {item['message']}")
    if metrics["missing_predictions"]:
        lines.append(f"no prediction for: {', '.join(metrics['missing_predictions'])}")
    return "\n".join(lines)
