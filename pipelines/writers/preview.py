"""A PNG preview of a segmentation: axial, coronal and sagittal slices with a coloured overlay.

Slices are cut from the closest canonical (RAS) orientation of the data and drawn in radiological
convention: the patient's right on the image left (axial, coronal), anterior up (axial), superior up
(coronal, sagittal), anterior on the image left (sagittal), each with its voxel spacing as aspect ratio.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from pipelines.errors import UsageError
from pipelines.volume import Volume

logger = logging.getLogger(__name__)

RGB = tuple[int, int, int]
LegendEntry = tuple[int, str, RGB | None]

CT_WINDOW = (400.0, 40.0)  # width, level: soft tissue
OVERLAY_ALPHA = 0.4
PERCENTILE_SAMPLES = 2_000_000
# Distinct colours for labels that bring none (Glasbey-like, readable on a grey image).
PALETTE: tuple[RGB, ...] = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
    (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180),
    (0, 0, 128), (128, 128, 128),
)


@dataclass(frozen=True)
class _View:
    """One panel: a slice (already flipped for display), its pixel aspect and edge letters."""

    name: str
    image: np.ndarray
    labels: np.ndarray
    aspect: float  # height / width of one displayed pixel
    width_mm: float
    height_mm: float
    letters: tuple[str, str, str, str]  # left, right, top, bottom


def render_preview(
    volume: Volume,
    labels: np.ndarray,
    legend: Sequence[LegendEntry],
    path: str | Path,
    title: str = "",
    uncertainty: np.ndarray | None = None,
) -> Path:
    """Write a PNG with three orthogonal slices through the centre of the segmented structures; with an
    ``uncertainty`` map (source grid, e.g. the largest across-member spread of any class) a second row shows it
    on the same cuts."""
    path = Path(path)
    image, mask, affine = _canonical(volume, labels)
    centre = _foreground_centre(mask)
    low, high = _display_window(image, volume.metadata.modality)
    views = _views(image, mask, affine, centre)
    spread = None
    if uncertainty is not None:
        canonical = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(uncertainty, np.float32), volume.affine))
        spread = _views(np.asanyarray(canonical.dataobj), mask, affine, centre)
    colours = _colours(legend, mask)
    names = {int(value): name for value, name, _ in legend}
    _draw(views, colours, names, (low, high), path, title or volume.metadata.case_id, spread)
    logger.info("wrote preview %s (centre voxel %s in RAS order, window %.0f..%.0f)", path.name, centre, low, high)
    return path


def _canonical(volume: Volume, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image (channel 0) and mask in the closest canonical orientation (RAS axes), and their affine."""
    image = np.asarray(volume.array)
    image = image[0] if image.ndim == 4 else image
    mask = np.asarray(labels)
    mask = mask[0] if mask.ndim == 4 else mask
    if image.shape != mask.shape:
        raise UsageError("PREVIEW_GRID_MISMATCH", f"labels shape {mask.shape} does not match the image {image.shape}")
    mask = np.rint(mask).astype(np.int32) if mask.dtype.kind == "f" else mask.astype(np.int32, copy=False)
    canonical_image = nib.as_closest_canonical(nib.Nifti1Image(image.astype(np.float32, copy=False), volume.affine))
    canonical_mask = nib.as_closest_canonical(nib.Nifti1Image(mask, volume.affine))
    return np.asanyarray(canonical_image.dataobj), np.asanyarray(canonical_mask.dataobj), canonical_image.affine


def _foreground_centre(mask: np.ndarray) -> tuple[int, int, int]:
    """The voxel nearest the centroid of all labelled voxels, or the centre of the grid when there are none."""
    foreground = mask > 0
    if not foreground.any():
        return (mask.shape[0] // 2, mask.shape[1] // 2, mask.shape[2] // 2)
    centre = ndimage.center_of_mass(foreground)
    return (int(round(centre[0])), int(round(centre[1])), int(round(centre[2])))


def _display_window(image: np.ndarray, modality: str) -> tuple[float, float]:
    """CT: the soft-tissue window when the data look like Hounsfield units; otherwise the 1st-99th percentile."""
    flat = image.reshape(-1)
    sample = flat[:: max(1, flat.size // PERCENTILE_SAMPLES)]
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return (0.0, 1.0)
    p1, p99 = (float(v) for v in np.percentile(sample, [1, 99]))
    if modality.upper() == "CT":
        width, level = CT_WINDOW
        low, high = level - width / 2, level + width / 2
        # Hounsfield data hold air, lung or fat (well below 0); raw scanner values (0..4095) do not.
        if p1 < -50 and p99 > low and p1 < high:
            return (low, high)
        logger.info("CT values %.0f..%.0f (1st-99th percentile) do not look like HU: percentile window", p1, p99)
    if p99 <= p1:
        return (p1, p1 + 1.0)
    return (p1, p99)


def _views(image: np.ndarray, mask: np.ndarray, affine: np.ndarray, centre: tuple[int, int, int]) -> list[_View]:
    """Axial, coronal and sagittal slices of RAS-ordered arrays, flipped for radiological display.

    A slice ``s[u, v]`` of RAS axes has u towards R (or A) and v towards A (or S); displayed as
    ``s.T[::-1, ::-1]`` rows run from A (or S) at the top and columns from R (or A) at the left.
    """
    sx, sy, sz = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    i, j, k = centre
    x, y, z = affine[:3, :3] @ np.asarray(centre, dtype=float) + affine[:3, 3]
    cuts = (
        (f"Axial  z = {z:.1f} mm", np.s_[:, :, k], (sx, sy), ("R", "L", "A", "P")),
        (f"Coronal  y = {y:.1f} mm", np.s_[:, j, :], (sx, sz), ("R", "L", "S", "I")),
        (f"Sagittal  x = {x:.1f} mm", np.s_[i, :, :], (sy, sz), ("A", "P", "S", "I")),
    )
    views = []
    for name, cut, (column_mm, row_mm), letters in cuts:
        shown_image = image[cut].T[::-1, ::-1]
        rows, columns = shown_image.shape
        views.append(_View(name, shown_image, mask[cut].T[::-1, ::-1], float(row_mm / column_mm),
                           float(columns * column_mm), float(rows * row_mm), letters))
    return views


def _colours(legend: Sequence[LegendEntry], mask: np.ndarray) -> dict[int, RGB]:
    """A colour for every label value present in the mask: the legend's, else the fixed palette's."""
    given = {int(value): colour for value, _, colour in legend if colour is not None}
    present = [int(v) for v in np.unique(mask) if v != 0]
    return {v: _rgb(given[v]) if v in given else PALETTE[(v - 1) % len(PALETTE)] for v in present}


def _rgb(colour: Sequence[int]) -> RGB:
    return (int(colour[0]), int(colour[1]), int(colour[2]))


def _unit_rgb(colour: RGB) -> tuple[float, float, float]:
    return (colour[0] / 255.0, colour[1] / 255.0, colour[2] / 255.0)


def _overlay(labels: np.ndarray, colours: dict[int, RGB]) -> np.ndarray:
    """An RGBA image: label colours at OVERLAY_ALPHA, transparent elsewhere."""
    rgba = np.zeros((*labels.shape, 4), dtype=np.float32)
    for value, colour in colours.items():
        inside = labels == value
        rgba[inside, :3] = _unit_rgb(colour)
        rgba[inside, 3] = OVERLAY_ALPHA
    return rgba


def _draw(
    views: list[_View],
    colours: dict[int, RGB],
    names: dict[int, str],
    window: tuple[float, float],
    path: Path,
    title: str,
    spread: list[_View] | None = None,
) -> None:
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:  # never switch the backend of an interactive session
        matplotlib.use("Agg")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    height_mm = max(v.height_mm for v in views)
    width_mm = sum(v.width_mm for v in views)
    panel_height_in = 4.2
    rows = 1 if spread is None else 2
    figure = Figure(figsize=(max(8.0, panel_height_in * width_mm / height_mm + 0.6),
                             rows * panel_height_in + 1.5), facecolor="black", dpi=110)
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(rows, len(views), width_ratios=[v.width_mm for v in views], left=0.01, right=0.99,
                               top=0.9 if rows == 2 else 0.86, bottom=0.17 / rows, wspace=0.04, hspace=0.12)
    for slot, view in enumerate(views):
        _draw_view(figure.add_subplot(grid[0, slot]), view, colours, window)
    if spread is not None:
        top = max(float(np.nanmax(v.image)) for v in spread) or 1.0
        for slot, view in enumerate(spread):
            axes = figure.add_subplot(grid[1, slot])
            axes.imshow(views[slot].image, cmap="gray", vmin=window[0], vmax=window[1], aspect=view.aspect)
            shown = axes.imshow(np.ma.masked_less_equal(view.image, 0.01 * top), cmap="inferno", vmin=0, vmax=top,
                                aspect=view.aspect, alpha=0.85, interpolation="nearest")
            axes.set_axis_off()
            axes.set_title(f"uncertainty (member spread)  {view.name}", color="white", fontsize=9)
        bar = figure.colorbar(shown, ax=figure.axes[-3:], orientation="vertical", fraction=0.02, pad=0.01)
        bar.ax.tick_params(colors="white", labelsize=8)
    handles = [Patch(facecolor=_unit_rgb(colours[v]), edgecolor="white", linewidth=0.5,
                     label=f"{v} {names.get(v, f'label {v}')}") for v in sorted(colours)]
    if handles:
        figure.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), frameon=False,
                      fontsize=9, labelcolor="white", handlelength=1.2, columnspacing=1.4)
    else:
        figure.text(0.5, 0.06, "no labelled voxels", color="white", ha="center", fontsize=9)
    figure.suptitle(title, color="white", fontsize=12)
    figure.savefig(path, format="png", facecolor=figure.get_facecolor())


def _draw_view(axes: Any, view: _View, colours: dict[int, RGB], window: tuple[float, float]) -> None:
    axes.imshow(view.image, cmap="gray", vmin=window[0], vmax=window[1], aspect=view.aspect,
                interpolation="bilinear")
    axes.imshow(_overlay(view.labels, colours), aspect=view.aspect, interpolation="nearest")
    for value, colour in colours.items():
        inside = view.labels == value
        if inside.any() and inside.shape[0] > 1 and inside.shape[1] > 1:
            axes.contour(inside.astype(np.float32), levels=[0.5], colors=[_unit_rgb(colour)],
                         linewidths=0.7)
    axes.set_xlim(-0.5, view.image.shape[1] - 0.5)
    axes.set_ylim(view.image.shape[0] - 0.5, -0.5)  # row 0 at the top
    axes.set_axis_off()
    axes.set_title(view.name, color="white", fontsize=10)
    left, right, top, bottom = view.letters
    style = {"color": "yellow", "fontsize": 11, "fontweight": "bold", "transform": axes.transAxes}
    axes.text(0.02, 0.5, left, ha="left", va="center", **style)
    axes.text(0.98, 0.5, right, ha="right", va="center", **style)
    axes.text(0.5, 0.98, top, ha="center", va="top", **style)
    axes.text(0.5, 0.02, bottom, ha="center", va="bottom", **style)
