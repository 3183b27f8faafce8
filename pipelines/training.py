"""``tessera train``: an MSD-style dataset in, checkpoint + manifest out.

Any family (``models.families``): random crops (more often centred on a structure than not) through the same
model-space mapping as inference, the family's loss (Dice-CE, or CE + Dice + RS-Tversky with deep supervision)
unless another is named, AdamW with a one-cycle schedule or the family's reference recipe; the checkpoint kept is
the one with the best mean Dice on held-out cases, measured through the full segmentation pipeline on the source
grid.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import monai
import numpy as np
import torch
from monai.data import CacheDataset, DataLoader, MetaTensor
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    Lambdad,
    LoadImaged,
    RandCropByLabelClassesd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    SpatialPadd,
)
from monai.utils import set_determinism

from models.checkpoints import load_into, read_state_dict, save_state_dict
from models.families import Family, TrainingRecipe, get_family
from models.losses import build_loss
from models.manifest import ModelManifest, PreprocessingSpec, file_sha256, manifest_from_dict
from models.networks import build_network
from pipelines.errors import InputError, UsageError
from pipelines.evaluation import mean_dice, score_case
from pipelines.inference import Predictor, resolve_device
from pipelines.ingestion.nifti import read_nifti
from pipelines.ingestion.reading import read_case
from pipelines.preprocessing import training_transforms
from pipelines.segment import segment_volume
from pipelines.volume import Volume

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingConfig:
    name: str
    iterations: int = 600
    batch_size: int = 2
    crop_size: tuple[int, int, int] = (64, 64, 32)
    learning_rate: float = 1e-3
    weight_decay: float = 1e-5
    validate_every: int = 100
    validation_cases: int = 2
    seed: int = 0
    device: str = "auto"
    family: str = "swin_unetr"
    network: dict[str, Any] = field(
        default_factory=lambda: {"feature_size": 12, "depths": [1, 1, 1, 1], "use_v2": False}
    )
    spacing: tuple[float, float, float] | None = (2.5, 2.5, 2.5)
    intensity: dict[str, Any] = field(
        default_factory=lambda: {"kind": "window", "a_min": -300.0, "a_max": 700.0, "b_min": 0.0, "b_max": 1.0}
    )
    roi_size: tuple[int, int, int] = (64, 64, 64)
    version: str = "1.0.0"
    init_weights: str | None = None  # start from these weights (fine-tuning, or continuing a run)
    save_fp16: bool = False  # store the kept checkpoint as float16
    loss: str | None = None  # "dicece" or "compound"; None: the family's default
    recipe: str = "default"  # "default": AdamW + one-cycle at learning_rate; "reference": the family's paper recipe
    keep_largest: list[int] | None = None  # labels kept as their largest component at inference; None: all
    crop_centres: str = "foreground"  # "foreground": 2 of 3 crops on any structure; "classes": equal per class
    # model-grid axes (RAS: 0 = left-right) along which the anatomy is symmetric: crops flipped along each at random
    # in training, and the model mirrors at inference (manifest inference.mirror_axes)
    mirror_axes: tuple[int, ...] = ()
    # labels reach the model grid as per-class fractions (one-hot, resampled trilinearly) instead of by nearest
    # neighbour, so a model coarser than its source learns where a boundary lies within a voxel (families whose
    # loss takes soft labels: diffusion)
    soft_labels: bool = False

    def training_recipe(self, family: Family) -> TrainingRecipe:
        if self.recipe == "default":
            return TrainingRecipe("adamw", self.learning_rate, self.weight_decay, "onecycle")
        if self.recipe == "reference" and family.reference_recipe is not None:
            return family.reference_recipe
        raise UsageError("BAD_RECIPE", f"recipe must be 'default' or 'reference' (for a family that has one); "
                                       f"{family.name} with {self.recipe!r} is not available")


@dataclass(frozen=True)
class MsdDataset:
    root: Path
    labels: dict[int, str]
    modalities: list[str]
    training: list[dict[str, Any]]  # {"image": Path or [Path per channel], "label": Path}


def read_msd_dataset(root: str | Path) -> MsdDataset:
    root = Path(root)
    path = root / "dataset.json"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise InputError("DATASET_INVALID", f"{root}: no dataset.json (an MSD-style folder is expected)") from exc
    except json.JSONDecodeError as exc:
        raise InputError("DATASET_INVALID", f"{path}: not valid JSON ({exc})") from exc
    labels = {int(k): str(v) for k, v in meta.get("labels", {}).items() if int(k) != 0}
    modalities = [str(meta.get("modality", {}).get(str(i), "unknown")) for i in range(len(meta.get("modality", {})))]
    pairs = [{"image": _paths(root, item["image"]), "label": (root / item["label"]).resolve()}
             for item in meta.get("training", [])]
    missing = [p for pair in pairs for p in (*_as_list(pair["image"]), pair["label"]) if not p.is_file()]
    if missing:
        raise InputError("DATASET_INVALID", f"{root}: {len(missing)} listed files are missing (e.g. {missing[0]})")
    if not labels or not pairs:
        raise InputError("DATASET_INVALID", f"{path}: needs 'labels' and a non-empty 'training' list")
    return MsdDataset(root=root, labels=labels, modalities=modalities or ["unknown"], training=pairs)


def _paths(root: Path, image: str | list[str]) -> Path | list[Path]:
    """An MSD image entry: one file, or one file per channel (nnU-Net's ``<case>_0000``, ``_0001``...)."""
    return [(root / p).resolve() for p in image] if isinstance(image, list) else (root / image).resolve()


def _as_list(image: Path | list[Path]) -> list[Path]:
    return image if isinstance(image, list) else [image]


def _manifest_for(config: TrainingConfig, dataset: MsdDataset, colors: dict[int, tuple[int, int, int]]) -> dict:
    unknown = sorted(set(config.keep_largest or []) - set(dataset.labels))
    if unknown:
        raise UsageError("BAD_ARGUMENT", f"keep-largest labels {unknown} are not labels of the dataset "
                                         f"{sorted(dataset.labels)}")
    network = get_family(config.family).resolve_settings(config.network, config.roi_size)
    return {
        "name": config.name,
        "version": config.version,
        "family": config.family,
        "description": f"{config.family} trained by 'tessera train' on {dataset.root.name}",
        "channels": [{"name": m, "modality": m} for m in dataset.modalities],
        "labels": [
            {"value": v, "name": n, **({"color": list(colors[v])} if v in colors else {})}
            for v, n in sorted(dataset.labels.items())
        ],
        "network": network,
        "preprocessing": {"orientation": "RAS", "spacing": list(config.spacing) if config.spacing else None,
                          "intensity": config.intensity},
        "inference": {"roi_size": list(config.roi_size), "overlap": 0.25, "mode": "gaussian", "sw_batch_size": 2,
                      "mirror_axes": sorted(config.mirror_axes)},
        "keep_largest_component": sorted(dataset.labels) if config.keep_largest is None else config.keep_largest,
        "weights": {"path": "model.pt", "sha256": None},
    }


def _case_image(case: dict[str, Any], manifest: ModelManifest) -> Volume:
    """A training case's image as inference reads it: one file per channel, resampled onto the first's grid."""
    return read_case(_as_list(case["image"]), manifest.channels, Path(_as_list(case["image"])[0]).name).volume


def _multichannel_items(manifest: ModelManifest, cases: list[dict[str, Any]]) -> list[dict[str, MetaTensor]]:
    items = []
    for case in cases:
        image, label = _case_image(case, manifest), read_nifti(case["label"])
        if label.spatial_shape != image.spatial_shape or not np.allclose(label.affine, image.affine, atol=1e-3):
            raise InputError("DATASET_INVALID", f"{case['label']}: the label is not on the first channel's grid")
        affine = torch.as_tensor(image.affine)
        items.append({"image": MetaTensor(torch.as_tensor(image.array, dtype=torch.float32), affine=affine),
                      "label": MetaTensor(torch.as_tensor(label.array[None], dtype=torch.float32), affine=affine)})
    return items


def _loader(manifest: ModelManifest, cases: list[dict[str, Any]], config: TrainingConfig) -> DataLoader:
    keys = ("image", "label")
    several = any(isinstance(case["image"], list) for case in cases)
    # one file per case: MONAI loads it; one file per channel: read like inference (channels on one grid)
    loading = [] if several else [LoadImaged(keys=keys, image_only=False), EnsureChannelFirstd(keys=keys)]
    soft_classes = len(manifest.labels) + 1 if config.soft_labels else None
    transforms = Compose([
        *loading,
        *model_grid_transforms(manifest.preprocessing, keys, config.crop_size, soft_classes),
        EnsureTyped(keys=keys, track_meta=False),
    ])
    random = Compose([
        _random_crop(keys, config, len(manifest.labels)),
        *[RandFlipd(keys=keys, spatial_axis=axis, prob=0.5) for axis in config.mirror_axes],
        RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
        RandShiftIntensityd(keys="image", offsets=0.05, prob=0.5),
    ])
    items: list[Any] = _multichannel_items(manifest, cases) if several else \
        [{k: str(v) for k, v in case.items()} for case in cases]
    cached = CacheDataset(items, transform=Compose([transforms, random]), cache_rate=1.0, num_workers=0,
                          progress=False)
    return DataLoader(cached, batch_size=1, shuffle=True, num_workers=0)


def model_grid_transforms(spec: PreprocessingSpec, keys: tuple[str, str], crop_size: tuple[int, int, int],
                          soft_classes: int | None) -> list[Any]:
    """Image and label to the model grid (:func:`training_transforms`), padded to at least ``crop_size``; soft
    labels (``soft_classes``) get their background completed where the padding left it empty."""
    steps = [*training_transforms(spec, keys, soft_classes), SpatialPadd(keys=keys, spatial_size=crop_size)]
    if soft_classes:
        steps.append(Lambdad(keys=keys[1], func=background_completed))
    return steps


def background_completed(fractions: torch.Tensor) -> torch.Tensor:
    """Per-class fractions ``(classes, *spatial)`` with the background channel made ``1 - sum(foreground)`` (padding
    and resampling leave it short), clipped to [0, 1]."""
    fractions = fractions.clamp(0, 1)
    background = (1 - fractions[1:].sum(0, keepdim=True)).clamp(0, 1)
    return torch.cat([background, fractions[1:]], dim=0)


CROP_CENTRES = ("foreground", "classes")


def _random_crop(keys: tuple[str, ...], config: TrainingConfig, foreground_classes: int) -> Any:
    """Crops centred on a structure 2 times in 3 (``foreground``), or on each class, background included, equally
    often (``classes``: small structures such as nodes are seen as often as a large primary tumour)."""
    if config.crop_centres == "foreground":
        return RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=config.crop_size, pos=2, neg=1,
                                      num_samples=config.batch_size)
    if config.crop_centres == "classes":
        return RandCropByLabelClassesd(keys=keys, label_key="label", spatial_size=config.crop_size,
                                       num_classes=foreground_classes + 1, ratios=[1.0] * (foreground_classes + 1),
                                       num_samples=config.batch_size, warn=False)
    raise UsageError("BAD_ARGUMENT", f"crop centres must be one of {', '.join(CROP_CENTRES)}; "
                                     f"got {config.crop_centres!r}")


def train(
    dataset_dir: str | Path,
    out_dir: str | Path,
    config: TrainingConfig,
    colors: dict[int, tuple[int, int, int]] | None = None,
    on_progress: Callable[[int, float], None] | None = None,
) -> ModelManifest:
    """Train a model and write ``model.pt``, ``manifest.json`` and ``training_log.json`` to ``out_dir``."""
    set_determinism(seed=config.seed)
    dataset = read_msd_dataset(dataset_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest_data = _manifest_for(config, dataset, colors or {})
    manifest = manifest_from_dict(manifest_data, manifest_path=out / "manifest.json")
    family = get_family(config.family)
    family.check_window(config.crop_size, manifest.network, "training crop")
    if config.soft_labels and not family.takes_soft_labels:
        raise UsageError("BAD_ARGUMENT", f"soft labels need a family whose loss takes them (diffusion); "
                                         f"{family.name}'s does not")
    if config.soft_labels and config.crop_centres != "classes":
        raise UsageError("BAD_ARGUMENT", "soft labels need --crop-centres classes (crops centred per class on the "
                                         "per-class fractions)")
    recipe = config.training_recipe(family)
    loss_name = config.loss or family.default_loss
    n_val = min(config.validation_cases, max(len(dataset.training) - 1, 0))
    train_cases = dataset.training[: len(dataset.training) - n_val]
    val_cases = dataset.training[len(dataset.training) - n_val :]
    device = resolve_device(config.device)
    network = build_network(manifest)
    if config.init_weights:
        load_into(network, read_state_dict(Path(config.init_weights)), config.name)
    network = network.to(device)
    loader = _loader(manifest, train_cases, config)
    loss_fn = build_loss(loss_name)
    optimizer, scheduler = _optimiser(network, recipe, config.iterations)
    validation = [(_case_image(c, manifest), read_nifti(c["label"])) for c in val_cases]
    log_rows: list[dict[str, Any]] = []
    best = (-1.0, 0)
    started = time.perf_counter()
    iteration = 0
    while iteration < config.iterations:
        for batch in loader:
            network.train()
            image = batch["image"].to(device)
            label = batch["label"].to(device)
            loss = family.training_loss(network, image, label, loss_fn, manifest.network)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            iteration += 1
            row: dict[str, Any] = {"iteration": iteration, "loss": round(float(loss), 5),
                                   "seconds": round(time.perf_counter() - started, 1)}
            if validation and (iteration % config.validate_every == 0 or iteration == config.iterations):
                row["val_mean_dice"] = _validate(network, manifest, validation, dataset.labels, device.type)
                if row["val_mean_dice"] > best[0]:
                    best = (row["val_mean_dice"], iteration)
                    save_state_dict(network.state_dict(), out / "model.pt", half=config.save_fp16)
                log.info("iteration %d: loss %.4f, validation mean Dice %.4f", iteration, loss, row["val_mean_dice"])
            log_rows.append(row)
            if on_progress:
                on_progress(iteration, float(loss))
            if iteration >= config.iterations:
                break
    if not validation:
        save_state_dict(network.state_dict(), out / "model.pt", half=config.save_fp16)
        best = (float("nan"), iteration)
    manifest_data["weights"]["sha256"] = file_sha256(out / "model.pt")
    manifest_data["training"] = {
        "dataset": dataset.root.name,
        "training_cases": len(train_cases),
        "validation_cases": [Path(_as_list(c["image"])[0]).name for c in val_cases],
        "best_validation_mean_dice": None if np.isnan(best[0]) else round(best[0], 4),
        "best_iteration": best[1],
        "config": {k: v for k, v in config.__dict__.items() if k != "name"},
        "loss": loss_name,
        "recipe": recipe.__dict__,
        "seconds": round(time.perf_counter() - started, 1),
        "initialised_from": _initial_weights_record(config.init_weights),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "platform": platform.platform(),
    }
    (out / "manifest.json").write_text(json.dumps(manifest_data, indent=2) + "\n")
    (out / "training_log.json").write_text(json.dumps(log_rows, indent=1) + "\n")
    return manifest_from_dict(manifest_data, manifest_path=out / "manifest.json")


def _initial_weights_record(init_weights: str | None) -> dict[str, Any] | None:
    """Where a fine-tuned model started: the initial weights' digest and, when a manifest lies beside them, how
    those were trained (so a model trained in stages keeps its whole history)."""
    if not init_weights:
        return None
    path = Path(init_weights)
    record: dict[str, Any] = {"weights": path.name, "weights_sha256": file_sha256(path)}
    beside = path.parent / "manifest.json"
    if beside.is_file():
        previous = json.loads(beside.read_text())
        if previous.get("weights", {}).get("sha256") == record["weights_sha256"]:
            record["model"] = f"{previous.get('name')} {previous.get('version')}"
            record["training"] = previous.get("training")
    return record


def _optimiser(
    network: torch.nn.Module, recipe: TrainingRecipe, iterations: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    optimisers = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}
    optimizer = optimisers[recipe.optimizer](network.parameters(), lr=recipe.learning_rate,
                                             weight_decay=recipe.weight_decay)
    scheduler: torch.optim.lr_scheduler.LRScheduler
    if recipe.schedule == "poly":
        scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=iterations, power=recipe.poly_exponent)
    else:
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe.learning_rate, total_steps=iterations,
                                                        pct_start=0.05)
    return optimizer, scheduler


def _validate(
    network: torch.nn.Module,
    manifest: ModelManifest,
    cases: list[tuple[Any, Any]],
    names: dict[int, str],
    device: str,
) -> float:
    predictor = Predictor.from_network(manifest, network, device=device)
    means = []
    for image, label in cases:
        result = segment_volume(image, predictor)
        scores = score_case(result.labels, label.array.astype(np.uint8), names, image.spacing)
        means.append(mean_dice(scores))
    return round(float(np.mean(means)), 4)
