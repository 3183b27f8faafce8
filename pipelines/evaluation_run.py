"""``tessera evaluate``: score a folder of predicted masks against reference label maps."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.errors import InputError, TesseraError
from pipelines.evaluation import auroc, score_case
from pipelines.ingestion.nifti import case_id_for, is_nifti, read_nifti
from pipelines.volume import Volume

log = logging.getLogger(__name__)

GEOMETRY_TOLERANCE_MM = 1e-3
NEAR_MM = 5.0  # the stricter uncertainty score counts only voxels this close to a true or predicted structure
UNCERTAINTY_FILE = "uncertainty.nii.gz"


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
    ranked: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (uncertainty, wrong, near) per scored case
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
            predicted = np.rint(prediction.array).astype(np.int32)
            scores = score_case(predicted, truth_labels, case_names, reference.spacing)
            uncertainty = _uncertainty(pred_path.parent / UNCERTAINTY_FILE, reference)
        except TesseraError as exc:
            failed.append({"case": case_id, "code": exc.code, "message": exc.message})
            continue
        cases[case_id] = {
            "labels": {s.name: {"dice": round(s.dice, 5), "hd95_mm": None if s.hd95_mm is None else round(s.hd95_mm, 3)}
                       for s in scores},
            "mean_dice": round(float(np.mean([s.dice for s in scores])), 5),
        }
        if uncertainty is not None:
            wrong = predicted != truth_labels
            near = _near_structures((predicted > 0) | (truth_labels > 0), reference.spacing)
            ranked.append((uncertainty, wrong, near))
            cases[case_id]["uncertainty_auroc"] = _rounded(auroc(uncertainty, wrong))
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
        **_uncertainty_summary(ranked),
        "prediction": str(pred_root),
        "reference": str(truth_root),
        "cases": cases,
        "per_label": per_label,
        "mean_dice": round(float(np.mean(all_dice)), 5) if all_dice else None,
        "missing_predictions": missing,
        "failed_cases": failed,
    }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _uncertainty(path: Path, reference: Volume) -> np.ndarray | None:
    """Per voxel, the largest across-member spread of any class (``std_*`` channels of ``uncertainty.nii.gz``,
    as the report names them), or ``None`` when the prediction has no uncertainty."""
    if not path.is_file():
        return None
    import nibabel as nib

    image: Any = nib.load(str(path))
    data = np.asarray(image.dataobj, dtype=np.float32)
    data = data[..., None] if data.ndim == 3 else data
    if data.shape[:3] != reference.spatial_shape or float(np.abs(image.affine - reference.affine).max()) > \
            GEOMETRY_TOLERANCE_MM:
        raise InputError("GEOMETRY_MISMATCH", f"{path.name} is not on the reference grid")
    try:
        channels = json.loads((path.parent / "report.json").read_text())["settings"]["network_runtime"][
            "uncertainty_channels"]
        spread = [i for i, name in enumerate(channels) if str(name).startswith("std_")]
    except (OSError, ValueError, KeyError, TypeError):
        spread = list(range(data.shape[-1]))
    result: np.ndarray = data[..., spread or list(range(data.shape[-1]))].max(-1)
    return result


def _near_structures(foreground: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    from scipy import ndimage

    if not foreground.any():
        return foreground
    distance: np.ndarray = ndimage.distance_transform_edt(~foreground, sampling=spacing)
    return distance <= NEAR_MM


def _uncertainty_summary(ranked: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """Does the uncertainty rank wrong voxels above right ones? AUROC pooled over every voxel of every case, and
    over the voxels within NEAR_MM of a true or predicted structure (where the question is hard)."""
    if not ranked:
        return {}
    scores = np.concatenate([u.ravel() for u, _, _ in ranked])
    wrong = np.concatenate([w.ravel() for _, w, _ in ranked])
    near = np.concatenate([n.ravel() for _, _, n in ranked])
    return {"uncertainty": {
        "score": "largest across-member standard deviation of any class, per voxel",
        "auroc_wrong_vs_right": _rounded(auroc(scores, wrong)),
        f"auroc_within_{NEAR_MM:g}mm": _rounded(auroc(scores[near], wrong[near])),
        "wrong_voxels": int(wrong.sum()),
        "voxels": int(wrong.size),
        "cases": len(ranked),
    }}


def format_table(metrics: dict[str, Any]) -> str:
    lines = [f"{'label':<20} {'Dice':>8} {'HD95 mm':>9}"]
    for name, row in metrics["per_label"].items():
        dice = "-" if row["dice"] is None else f"{row['dice']:.4f}"
        hd = "-" if row["hd95_mm"] is None else f"{row['hd95_mm']:.2f}"
        lines.append(f"{name:<20} {dice:>8} {hd:>9}")
    mean = metrics["mean_dice"]
    lines.append(f"{'mean':<20} {'-' if mean is None else f'{mean:.4f}':>8}")
    lines.append(f"{len(metrics['cases'])} case(s) scored")
    if "uncertainty" in metrics:
        u = metrics["uncertainty"]
        near = next(v for k, v in u.items() if k.startswith("auroc_within"))
        lines.append(f"uncertainty AUROC (wrong vs right voxels): {u['auroc_wrong_vs_right']} over all voxels, "
                     f"{near} within {NEAR_MM:g} mm of a structure ({u['wrong_voxels']} wrong of {u['voxels']})")
    for item in metrics["failed_cases"]:
        lines.append(f"FAILED {item['case']}: {item['code']}: {item['message']}")
    if metrics["missing_predictions"]:
        lines.append(f"no prediction for: {', '.join(metrics['missing_predictions'])}")
    return "\n".join(lines)
