"""Label statistics (volumes, intensities, centroids, boxes) and the PNG preview.

Checked against direct numpy computations on phantoms, across stored orientations (the same physical
phantom must give the same numbers), and against pyradiomics' published baselines on its test masks.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk  # noqa: N813 (its usual name)

from pipelines.phantoms import STRUCTURES, Phantom, make_phantom
from pipelines.volume import Volume, VolumeMetadata
from pipelines.writers import statistics
from pipelines.writers.preview import _canonical, _display_window, _foreground_centre, _views, render_preview
from pipelines.writers.statistics import LabelStatistics, label_statistics, write_statistics

NAMES = {s.value: s.name for s in STRUCTURES}
ABSENT = 9
LEGEND = [(s.value, s.name, s.color) for s in STRUCTURES]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def phantom_volume(phantom: Phantom, modality: str = "CT") -> tuple[Volume, np.ndarray]:
    image = phantom.image
    volume = Volume(np.asanyarray(image.dataobj), image.affine, VolumeMetadata("phantom", "test", modality))
    return volume, np.asanyarray(phantom.label.dataobj)


@pytest.fixture(scope="module")
def phantom_case() -> tuple[Volume, np.ndarray]:
    return phantom_volume(make_phantom(3, spacing=(4.0, 4.0, 5.0)))


@pytest.fixture(scope="module")
def phantom_stats(phantom_case: tuple[Volume, np.ndarray]) -> dict[int, LabelStatistics]:
    volume, labels = phantom_case
    stats = label_statistics(labels, volume, {**NAMES, ABSENT: "absent"})
    return {s.value: s for s in stats}


def xyz(triple: tuple[float, float, float] | None) -> np.ndarray:
    assert triple is not None
    return np.asarray(triple, dtype=float)


def world_centroid(labels: np.ndarray, value: int, affine: np.ndarray) -> np.ndarray:
    """The direct computation: mean voxel index of the label, through the affine."""
    index = np.argwhere(labels == value).mean(axis=0)
    return affine[:3, :3] @ index + affine[:3, 3]


# --- statistics on phantoms ------------------------------------------------------------------------------


def test_volumes_are_voxel_count_times_voxel_volume(phantom_case, phantom_stats) -> None:
    volume, labels = phantom_case
    voxel_ml = abs(np.linalg.det(volume.affine[:3, :3])) / 1000.0
    assert voxel_ml == pytest.approx(4.0 * 4.0 * 5.0 / 1000.0, rel=1e-12)
    for value in NAMES:
        stat = phantom_stats[value]
        assert stat.voxel_count == np.count_nonzero(labels == value) > 0
        assert stat.volume_ml == stat.voxel_count * voxel_ml
        assert stat.voxel_volume_ml == voxel_ml
        assert stat.spacing_mm == pytest.approx(volume.spacing)


def test_intensities_match_direct_computation(phantom_case, phantom_stats) -> None:
    volume, labels = phantom_case
    for value in NAMES:
        inside = volume.array[labels == value].astype(np.float64)
        stat = phantom_stats[value]
        assert stat.intensity_mean == pytest.approx(inside.mean(), rel=1e-12)
        assert stat.intensity_std == pytest.approx(inside.std(), rel=1e-9)
        assert (stat.intensity_min, stat.intensity_max) == (inside.min(), inside.max())


def test_centroids_and_boxes_match_direct_computation(phantom_case, phantom_stats) -> None:
    volume, labels = phantom_case
    for value in NAMES:
        stat = phantom_stats[value]
        direct = world_centroid(labels, value, volume.affine)
        # Far inside the half voxel asked for: it is the same quantity, computed another way.
        np.testing.assert_allclose(xyz(stat.centroid_ras_mm), direct, atol=1e-6)
        assert np.linalg.norm(np.subtract(stat.centroid_ras_mm, direct)) < 0.5 * min(volume.spacing)
        x, y, z = stat.centroid_ras_mm
        assert stat.centroid_lps_mm == (-x, -y, z)
        where = np.argwhere(labels == value)
        assert stat.bbox_min == tuple(where.min(axis=0)) and stat.bbox_max == tuple(where.max(axis=0))
        extent = (np.array(stat.bbox_max) - np.array(stat.bbox_min) + 1) * np.array(volume.spacing)
        np.testing.assert_allclose(stat.bbox_size_mm, extent)
    # Anatomy in RAS+: the liver on the patient's right (+x), the spleen on the left, the spine posterior.
    assert phantom_stats[1].centroid_ras_mm[0] > phantom_stats[2].centroid_ras_mm[0]
    assert phantom_stats[5].centroid_ras_mm[1] < phantom_stats[1].centroid_ras_mm[1]


def test_absent_label_is_reported_empty(phantom_stats) -> None:
    stat = phantom_stats[ABSENT]
    assert (stat.name, stat.voxel_count, stat.volume_ml) == ("absent", 0, 0.0)
    assert stat.intensity_mean is stat.intensity_std is stat.intensity_min is stat.intensity_max is None
    assert stat.centroid_ras_mm is stat.centroid_lps_mm is stat.bbox_min is stat.bbox_max is stat.bbox_size_mm is None


def test_statistics_do_not_depend_on_stored_orientation() -> None:
    """The same physical phantom stored RAS and ASL: same counts, volumes, intensities, world centroids."""
    results = {}
    for orientation in ("RAS", "ASL"):
        volume, labels = phantom_volume(make_phantom(3, orientation=orientation, spacing=(4.0, 4.0, 5.0)))
        assert volume.orientation == orientation
        results[orientation] = (label_statistics(labels, volume, NAMES), nib.aff2axcodes(volume.affine))
    (ras, ras_codes), (asl, asl_codes) = results["RAS"], results["ASL"]
    for a, b in zip(ras, asl, strict=True):
        assert (a.value, a.voxel_count, a.volume_ml) == (b.value, b.voxel_count, b.volume_ml)
        assert a.intensity_mean == pytest.approx(b.intensity_mean, rel=1e-12)
        assert (a.intensity_min, a.intensity_max) == (b.intensity_min, b.intensity_max)
        np.testing.assert_allclose(xyz(a.centroid_ras_mm), xyz(b.centroid_ras_mm), atol=1e-6)
        np.testing.assert_allclose(xyz(a.centroid_lps_mm), xyz(b.centroid_lps_mm), atol=1e-6)
        # Box extents are along the voxel axes: reorder both to world x, y, z before comparing.
        np.testing.assert_allclose(_world_order(a.bbox_size_mm, ras_codes), _world_order(b.bbox_size_mm, asl_codes))


def _world_order(sizes, codes) -> list[float]:
    world_axis = ["RLAPSI".index(code) // 2 for code in codes]
    return [sizes[world_axis.index(axis)] for axis in range(3)]


@pytest.mark.parametrize("dtype", ["uint8", "int16", "int32", "float32"])
@pytest.mark.parametrize("fortran", [False, True])
def test_many_labels_match_naive_loop(monkeypatch, dtype: str, fortran: bool) -> None:
    """Random labels on a small oblique grid, with values not asked for, streamed in many small slabs."""
    monkeypatch.setattr(statistics, "SLAB_VOXELS", 700)
    rng = np.random.default_rng(7)
    shape = (13, 17, 11)
    labels = rng.integers(-3 if dtype != "uint8" else 0, 40, shape).astype(dtype)
    image = rng.normal(40.0, 30.0, (2, *shape)).astype(np.float32)  # channel-first: channel 0 counts
    if fortran:
        labels, image = np.asfortranarray(labels), np.asfortranarray(image)
    affine = np.array([[0.0, -1.2, 0.3, 10.0], [0.9, 0.0, 0.0, -5.0], [0.0, 0.1, 2.5, 30.0], [0, 0, 0, 1]])
    volume = Volume(image, affine, VolumeMetadata("random", "test", "MR"))
    names = {v: f"label{v}" for v in range(-2, 45, 2)}  # 42 and 44 are absent, odd values are not asked for
    stats = label_statistics(labels, volume, names)
    assert [s.value for s in stats] == sorted(names)
    for stat in stats:
        inside = labels == stat.value
        assert stat.voxel_count == np.count_nonzero(inside)
        if not stat.voxel_count:
            assert stat.centroid_ras_mm is None
            continue
        values = image[0][inside].astype(np.float64)
        assert stat.intensity_mean == pytest.approx(values.mean(), rel=1e-9)
        assert stat.intensity_std == pytest.approx(values.std(), rel=1e-6)
        assert (stat.intensity_min, stat.intensity_max) == (values.min(), values.max())
        np.testing.assert_allclose(xyz(stat.centroid_ras_mm), world_centroid(labels, stat.value, affine), atol=1e-9)
        assert stat.bbox_min == tuple(np.argwhere(inside).min(axis=0))


def test_label_values_far_apart_use_sorted_search() -> None:
    labels = np.zeros((6, 5, 4), dtype=np.int64)
    labels[1, 1, 1] = 2**40
    labels[2:4, 2, 3] = 3
    volume = Volume(np.ones((6, 5, 4), np.float32), np.diag([2.0, 2.0, 2.0, 1.0]), VolumeMetadata("x", "t"))
    stats = label_statistics(labels, volume, {3: "small", 2**40: "huge"})
    assert [(s.value, s.voxel_count) for s in stats] == [(3, 2), (2**40, 1)]
    assert stats[1].centroid_ras_mm == (2.0, 2.0, 2.0)


def test_grid_mismatch_is_a_usage_error(phantom_case) -> None:
    from pipelines.errors import UsageError

    volume, labels = phantom_case
    with pytest.raises(UsageError, match="STATISTICS_GRID_MISMATCH"):
        label_statistics(labels[:-1], volume, NAMES)


def test_write_statistics_json_and_csv(phantom_case, phantom_stats, tmp_path: Path) -> None:
    volume, _ = phantom_case
    stats = [phantom_stats[v] for v in sorted(phantom_stats)]
    json_path, csv_path = write_statistics(stats, tmp_path / "stats.json", tmp_path / "stats.csv")
    document = json.loads(json_path.read_text())
    assert document["units"]["volume"] == "ml"
    assert document["spacing_mm"] == pytest.approx(list(volume.spacing))  # voxel axes i, j, k (stored ASL)
    assert sorted(document["spacing_mm"]) == pytest.approx([4.0, 4.0, 5.0])
    assert document["voxel_volume_mm3"] == pytest.approx(80.0)
    liver = document["labels"][0]
    assert liver["name"] == "liver" and liver["centroid_ras_mm"] == list(phantom_stats[1].centroid_ras_mm)
    assert document["labels"][-1]["centroid_lps_mm"] is None
    with csv_path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["value"]) for r in rows] == sorted(phantom_stats)
    assert float(rows[0]["centroid_ras_x_mm"]) == phantom_stats[1].centroid_ras_mm[0]
    assert float(rows[0]["volume_ml"]) == phantom_stats[1].volume_ml
    assert rows[-1]["centroid_lps_y_mm"] == "" and rows[-1]["voxel_count"] == "0"
    assert {"bbox_min_i", "bbox_max_k", "bbox_size_j_mm", "intensity_std"} <= set(rows[0])


def test_fast_on_a_large_mask() -> None:
    """A 256 x 256 x 200 mask with 100 labels (1/8 of the 512 x 512 x 400 target): well under a second or two."""
    import time

    rng = np.random.default_rng(0)
    labels = np.zeros((256, 256, 200), dtype=np.uint8)
    for value in range(1, 101):
        i, j, k = rng.integers(0, 230, 3)
        labels[i : i + 20, j : j + 20, k : k + 12] = value
    volume = Volume(np.zeros(labels.shape, np.int16), np.diag([0.8, 0.8, 1.5, 1.0]), VolumeMetadata("big", "t", "CT"))
    start = time.perf_counter()
    stats = label_statistics(labels, volume, {v: str(v) for v in range(1, 101)})
    assert time.perf_counter() - start < 5.0  # about 0.1 s on 2 cores; a per-label mask loop takes ~10x longer
    assert sum(s.voxel_count for s in stats) == np.count_nonzero(labels)


# --- pyradiomics baselines (shared data) ---------------------------------------------------------------

PYRADIOMICS_CASES = ("brain1", "brain2", "breast1", "lung1", "lung2")
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def sitk_volume(image) -> Volume:
    """A SimpleITK image as a Volume: array reindexed [i, j, k], LPS direction/origin/spacing to a RAS affine."""

    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0)  # SimpleITK arrays are [k, j, i]
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)  # columns: LPS axis directions
    affine = np.eye(4)
    affine[:3, :3] = LPS_TO_RAS @ direction @ np.diag(image.GetSpacing())
    affine[:3, 3] = LPS_TO_RAS @ np.array(image.GetOrigin())
    return Volume(array, affine, VolumeMetadata("pyradiomics", "nrrd", "unknown", source_format="nrrd"))


def read_baseline(path: Path) -> dict[str, dict[str, str]]:
    """pyradiomics baseline CSV: one row per feature, one column per test case."""
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    cases = rows[0][1:]
    return {case: {row[0]: row[1 + n] for row in rows[1:]} for n, case in enumerate(cases)}


@pytest.fixture(scope="module")
def pyradiomics_data(shared_data: Path) -> Path:
    folder = shared_data / "pyradiomics" / "data"
    if not (folder / "baseline" / "baseline_shape.csv").is_file():
        pytest.skip("pyradiomics test data absent from the shared data")
    return folder


def _read_case(folder: Path, case: str) -> tuple[Volume, Volume]:
    """Mask and image as Volumes; lung1/lung2 images are absent from the snapshot: the mask stands in."""

    mask = sitk_volume(sitk.ReadImage(str(folder / f"{case}_label.nrrd")))
    image_path = folder / f"{case}_image.nrrd"
    image = sitk_volume(sitk.ReadImage(str(image_path))) if image_path.is_file() else mask
    return mask, image


@pytest.mark.shared_data
@pytest.mark.parametrize("name", ["brain1_label.nrrd", "breast1_label.nrrd", "prostate_phantom_subvolume-label.nrrd"])
def test_sitk_conversion_matches_sitk_geometry(pyradiomics_data: Path, name: str) -> None:
    """Our RAS affine maps every index to SimpleITK's physical point with x and y negated (LPS -> RAS)."""

    image = sitk.ReadImage(str(pyradiomics_data / name))
    volume = sitk_volume(image)
    size = np.array(image.GetSize())
    assert volume.spatial_shape == tuple(size)
    for index in [(0, 0, 0), tuple(size - 1), (int(size[0]) - 1, 0, 1), (1, int(size[1]) // 2, int(size[2]) - 1)]:
        lps = np.array(image.TransformIndexToPhysicalPoint([int(v) for v in index]))
        ras = volume.affine[:3, :3] @ np.array(index, dtype=float) + volume.affine[:3, 3]
        np.testing.assert_allclose(ras, LPS_TO_RAS @ lps, atol=1e-9)
    # And pixel values land on the same indices.
    probe = tuple(int(v) for v in size // 2)
    assert volume.array[probe] == image.GetPixel(probe)
    np.testing.assert_allclose(volume.spacing, image.GetSpacing())


@pytest.mark.shared_data
def test_sitk_conversion_orientation_codes(pyradiomics_data: Path) -> None:

    # brain1: LPS direction diag(1, -1, 1), so i runs towards L, j towards A, k towards S.
    brain = sitk_volume(sitk.ReadImage(str(pyradiomics_data / "brain1_label.nrrd")))
    assert brain.orientation == "LAS"
    # prostate phantom: direction diag(-1, -1, 1) in LPS is RAS.
    prostate = sitk_volume(sitk.ReadImage(str(pyradiomics_data / "prostate_phantom_subvolume-label.nrrd")))
    assert prostate.orientation == "RAS"


@pytest.mark.shared_data
@pytest.mark.parametrize("case", PYRADIOMICS_CASES)
def test_volumes_match_pyradiomics_baseline(pyradiomics_data: Path, case: str) -> None:
    """Label 1 (pyradiomics' default label) against ``original_shape_VoxelVolume`` (voxel count x voxel volume, mm^3).

    ``original_shape_MeshVolume`` is the volume enclosed by a marching-cubes surface and is a few percent
    smaller; it is not what we measure. The columns without a suffix are the runs without resampling.
    """
    shape = read_baseline(pyradiomics_data / "baseline" / "baseline_shape.csv")
    mask, image = _read_case(pyradiomics_data, case)
    (stat,) = label_statistics(mask.array, image, {1: "roi"})
    baseline_mm3 = float(shape[case]["original_shape_VoxelVolume"])
    assert stat.volume_ml * 1000.0 == pytest.approx(baseline_mm3, rel=0.01)
    assert stat.volume_ml * 1000.0 == pytest.approx(baseline_mm3, rel=1e-9)  # in fact, exactly the same
    assert stat.voxel_count == int(shape[case]["diagnostics_Mask-original_VoxelNum"])
    # pyradiomics' centre of mass of the original mask is in LPS millimetres (given in its resampling runs).
    centre = shape[f"{case}_resampling"]["diagnostics_Mask-original_CenterOfMass"]
    centre_lps = json.loads(centre.replace("(", "[").replace(")", "]"))
    np.testing.assert_allclose(xyz(stat.centroid_lps_mm), centre_lps, atol=1e-6)


@pytest.mark.shared_data
@pytest.mark.parametrize("case", ["brain1", "brain2", "breast1"])
def test_intensities_match_pyradiomics_baseline(pyradiomics_data: Path, case: str) -> None:
    firstorder = read_baseline(pyradiomics_data / "baseline" / "baseline_firstorder.csv")[case]
    mask, image = _read_case(pyradiomics_data, case)
    (stat,) = label_statistics(mask.array, image, {1: "roi"})
    assert stat.intensity_mean == pytest.approx(float(firstorder["original_firstorder_Mean"]), rel=1e-9)
    assert stat.intensity_min == float(firstorder["original_firstorder_Minimum"])
    assert stat.intensity_max == float(firstorder["original_firstorder_Maximum"])


# --- preview -------------------------------------------------------------------------------------------


def _read_png(path: Path) -> np.ndarray:
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_MAGIC
    return matplotlib.image.imread(str(path))


def test_preview_renders_png(phantom_case, tmp_path: Path) -> None:
    volume, labels = phantom_case
    path = render_preview(volume, labels, LEGEND, tmp_path / "preview.png", title="phantom 3")
    pixels = _read_png(path)
    height, width = pixels.shape[:2]
    assert 300 <= height <= 2000 and 600 <= width <= 4000
    rgb = pixels[..., :3]
    centre = rgb[height // 2 - 40 : height // 2 + 40, width // 2 - 40 : width // 2 + 40]
    assert centre.std() > 0.02 and centre.max() > 0.2  # image content, not a blank panel
    # The overlay is there: some strongly coloured (non-grey) pixels.
    assert (np.ptp(rgb, axis=2) > 0.15).sum() > 500


def test_preview_is_the_same_for_any_stored_orientation(tmp_path: Path) -> None:
    paths = []
    for orientation in ("RAS", "ASL"):
        volume, labels = phantom_volume(make_phantom(3, orientation=orientation, spacing=(4.0, 4.0, 5.0)))
        paths.append(render_preview(volume, labels, LEGEND, tmp_path / f"{orientation}.png", title="same"))
    np.testing.assert_array_equal(_read_png(paths[0]), _read_png(paths[1]))


def test_preview_views_are_radiological(phantom_case) -> None:
    """Axial: liver (patient right) on the image left, spine at the bottom (posterior); sagittal: anterior left."""
    volume, labels = phantom_case
    image, mask, affine = _canonical(volume, labels)
    centre = _foreground_centre(mask)
    axial, coronal, sagittal = _views(image, mask, affine, centre)

    def mean_position(view_labels: np.ndarray, value: int) -> np.ndarray:
        return np.argwhere(view_labels == value).mean(axis=0)  # (row, column)

    liver, spleen, spine = (mean_position(axial.labels, v) for v in (1, 2, 5))
    assert liver[1] < spleen[1]  # patient right on the image left
    assert spine[0] > liver[0]  # posterior at the bottom
    assert axial.letters == ("R", "L", "A", "P") and coronal.letters == ("R", "L", "S", "I")
    assert sagittal.letters == ("A", "P", "S", "I")
    column_mm, row_mm = 4.0, 5.0  # coronal: x across, z down
    assert coronal.aspect == pytest.approx(row_mm / column_mm)
    # Superior up and patient right on the left: the coronal view's top row is the grid's highest z, x reversed.
    np.testing.assert_array_equal(coronal.image[0], image[::-1, centre[1], -1])
    np.testing.assert_array_equal(sagittal.image[-1], image[centre[0], ::-1, 0])  # bottom row: lowest z, A on the left


def test_preview_without_labels_and_other_modalities(tmp_path: Path) -> None:
    volume, labels = phantom_volume(make_phantom(4, spacing=(4.0, 4.0, 5.0)), modality="MR")
    path = render_preview(volume, np.zeros_like(labels), LEGEND, tmp_path / "empty.png")
    assert _read_png(path).shape[0] > 300
    path = render_preview(volume, (labels == 2) * 7, [], tmp_path / "uncoloured.png")  # no legend: palette colour
    assert _read_png(path).shape[0] > 300


def test_display_window() -> None:
    rng = np.random.default_rng(0)
    hounsfield = np.concatenate([np.full(1000, -1000.0), rng.normal(40, 20, 5000)]).astype(np.float32)
    assert _display_window(hounsfield, "CT") == (-160.0, 240.0)
    raw = hounsfield + 1024.0  # CT stored as unsigned scanner values: not HU, percentiles instead
    low, high = _display_window(raw, "CT")
    assert (low, high) == pytest.approx(tuple(np.percentile(raw, [1, 99])))
    low, high = _display_window(hounsfield, "MR")
    assert (low, high) == pytest.approx(tuple(np.percentile(hounsfield, [1, 99])))
    assert _display_window(np.zeros(10, np.float32), "PT") == (0.0, 1.0)


def test_preview_gains_an_uncertainty_row(phantom_case, tmp_path: Path) -> None:
    volume, labels = phantom_case
    from scipy import ndimage

    # spread on the structures' boundaries, as a sampling family gives it
    boundary = ndimage.binary_dilation(labels > 0, iterations=1) & ~ndimage.binary_erosion(labels > 0, iterations=1)
    spread = ndimage.gaussian_filter(boundary.astype(np.float32), 1.0) * 0.3
    plain = _read_png(render_preview(volume, labels, LEGEND, tmp_path / "plain.png"))
    with_spread = _read_png(render_preview(volume, labels, LEGEND, tmp_path / "spread.png", uncertainty=spread))
    assert with_spread.shape[0] > 1.6 * plain.shape[0]  # a second row of panels
    lower = with_spread[with_spread.shape[0] // 2 :, :, :3]
    warm = (lower[..., 0] > 0.6) & (lower[..., 0] - lower[..., 2] > 0.3)  # inferno's orange and yellow
    assert warm.sum() > 200
