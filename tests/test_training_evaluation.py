"""`tessera train` and `tessera evaluate` on tiny data: real commands, real files."""

import json

import nibabel as nib
import numpy as np
import pytest

from models.manifest import file_sha256, load_manifest
from pipelines.errors import InputError
from pipelines.evaluation import score_case
from pipelines.phantoms import make_phantom
from pipelines.training import _initial_weights_record, read_msd_dataset
from tests.conftest import run_tessera as tessera


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("msd")
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir()
    training = []
    for seed in range(3):
        phantom = make_phantom(100 + seed, spacing=(5.0, 5.0, 6.0))
        nib.save(phantom.image, root / "imagesTr" / f"p{seed}.nii.gz")
        nib.save(phantom.label, root / "labelsTr" / f"p{seed}.nii.gz")
        training.append({"image": f"./imagesTr/p{seed}.nii.gz", "label": f"./labelsTr/p{seed}.nii.gz"})
    labels = {"0": "background", "1": "liver", "2": "spleen", "3": "kidney_left", "4": "kidney_right", "5": "spine"}
    (root / "dataset.json").write_text(json.dumps({"labels": labels, "modality": {"0": "CT"}, "training": training}))
    return root


def test_train_writes_a_usable_model(tmp_path, tiny_dataset):
    out = tmp_path / "model"
    run = tessera("train", str(tiny_dataset), "-o", str(out), "--name", "trained-tiny", "--iterations", "2",
                  "--validate-every", "2", "--validation-cases", "1", "--crop", "64,32,32", "--roi", "64",
                  "--spacing", "5", "--device", "cpu")
    assert run.returncode == 0, run.stderr
    manifest = load_manifest(out / "manifest.json")
    assert manifest.weights.sha256 == file_sha256(out / "model.pt")
    assert manifest.training["validation_cases"] == ["p2.nii.gz"]
    assert manifest.training["best_validation_mean_dice"] is not None
    assert [lbl.name for lbl in manifest.labels][-1] == "spine"
    assert manifest.labels[0].color is not None  # phantom label names get their display colours
    log = json.loads((out / "training_log.json").read_text())
    assert [row["iteration"] for row in log] == [1, 2] and "val_mean_dice" in log[-1]
    segmented = tessera("segment", str(tiny_dataset / "imagesTr" / "p0.nii.gz"), "-o", str(tmp_path / "seg"),
                        "--model", str(out / "manifest.json"))
    assert segmented.returncode == 0, segmented.stderr
    assert manifest.training["initialised_from"] is None
    # a model fine-tuned from these weights (--init) records where it started and how that was trained
    start = _initial_weights_record(str(out / "model.pt"))
    assert start is not None and start["weights_sha256"] == manifest.weights.sha256
    assert start["model"] == "trained-tiny 1.0.0" and start["training"] == manifest.training
    (out / "model.pt").rename(out / "other.pt")
    (out / "other.pt").write_bytes((out / "other.pt").read_bytes() + b"changed")
    assert "training" not in _initial_weights_record(str(out / "other.pt"))  # the manifest beside is not theirs


def test_dataset_errors(tmp_path):
    with pytest.raises(InputError) as info:
        read_msd_dataset(tmp_path)
    assert info.value.code == "DATASET_INVALID"
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"1": "a"}, "training": [
        {"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}]}))
    with pytest.raises(InputError, match="listed files are missing"):
        read_msd_dataset(tmp_path)


def test_scores_known_overlap():
    reference = np.zeros((20, 20, 20), np.uint8)
    reference[5:15, 5:15, 5:15] = 1
    prediction = np.zeros_like(reference)
    prediction[5:15, 5:15, 5:10] = 1  # half of the cube
    prediction[0, 0, 0] = 2  # a label absent from the reference
    scores = {s.name: s for s in score_case(prediction, reference, {1: "a", 2: "b"}, (1.0, 1.0, 2.0))}
    assert scores["a"].dice == pytest.approx(2 * 500 / 1500)
    assert scores["a"].hd95_mm == pytest.approx(10.0)  # 5 voxels of 2 mm along the last axis
    assert scores["b"].dice == 0.0 and scores["b"].hd95_mm is None


def test_evaluate_refuses_a_mask_on_another_grid(tmp_path):
    truth, pred = tmp_path / "truth", tmp_path / "pred"
    truth.mkdir()
    pred.mkdir()
    labels = np.zeros((10, 10, 10), np.uint8)
    labels[2:6, 2:6, 2:6] = 1
    nib.save(nib.Nifti1Image(labels, np.eye(4)), truth / "a.nii.gz")
    nib.save(nib.Nifti1Image(labels, np.eye(4)), pred / "a.nii.gz")
    flipped = np.diag([-1.0, 1, 1, 1])
    flipped[0, 3] = 9
    nib.save(nib.Nifti1Image(labels, np.eye(4)), truth / "b.nii.gz")
    nib.save(nib.Nifti1Image(labels[::-1].copy(), flipped), pred / "b.nii.gz")
    run = tessera("evaluate", "--pred", str(pred), "--truth", str(truth))
    assert run.returncode == 1
    metrics = json.loads((pred / "metrics.json").read_text())
    assert metrics["cases"]["a"]["labels"]["label_1"]["dice"] == 1.0
    assert metrics["failed_cases"][0]["case"] == "b" and metrics["failed_cases"][0]["code"] == "GEOMETRY_MISMATCH"


def test_a_32_cube_crop_is_refused_before_training(tmp_path, tiny_dataset):
    run = tessera("train", str(tiny_dataset), "-o", str(tmp_path / "m"), "--name", "x", "--iterations", "1",
                  "--crop", "32")
    assert run.returncode == 1
    assert "MANIFEST_INVALID" in run.stderr and "bottleneck" in run.stderr and "Traceback" not in run.stderr


def test_train_the_mamba_clinix_family_with_its_reference_recipe(tmp_path, tiny_dataset):
    out = tmp_path / "mamba"
    run = tessera("train", str(tiny_dataset), "-o", str(out), "--name", "tiny-mamba", "--family", "mamba_clinix",
                  "--base-channels", "4", "--max-channels", "16", "--gating", "mul", "--scan-directions",
                  "forward,reversed", "--recipe", "reference", "--iterations", "2", "--validate-every", "2",
                  "--validation-cases", "1", "--crop", "32", "--roi", "32", "--spacing", "5", "--device", "cpu")
    assert run.returncode == 0, run.stderr
    manifest = load_manifest(out / "manifest.json")
    assert manifest.family == "mamba_clinix"
    assert manifest.network == {"base_channels": 4, "max_channels": 16, "gating": "mul",
                                "scan_directions": ["forward", "reversed"], "stages": 4}
    assert manifest.training["loss"] == "compound"
    assert manifest.training["recipe"] == {"optimizer": "adam", "learning_rate": 1e-4, "weight_decay": 1e-5,
                                           "schedule": "poly", "poly_exponent": 0.9}
    segmented = tessera("segment", str(tiny_dataset / "imagesTr" / "p0.nii.gz"), "-o", str(tmp_path / "seg"),
                        "--model", str(out / "manifest.json"))
    assert segmented.returncode == 0, segmented.stderr
    report = json.loads((tmp_path / "seg" / "p0" / "report.json").read_text())
    assert report["model"]["family"] == "mamba_clinix" and report["settings"]["network_runtime"]["scan_backends"]


@pytest.mark.parametrize(("args", "code", "words"), [
    (["--family", "mamba_clinix", "--crop", "36,32,32", "--roi", "32"], 1, "(36, 32, 32)"),
    (["--family", "mamba_clinix", "--base-channels", "6", "--crop", "32", "--roi", "32"], 1, "does not divide"),
    (["--recipe", "reference"], 2, "BAD_RECIPE"),
    (["--keep-largest", "9"], 2, "keep-largest labels [9]"),
    (["--keep-largest", "liver"], 2, "BAD_ARGUMENT"),
    (["--mirror-axes", "0,3"], 2, "distinct axes among 0,1,2"),
    (["--soft-labels", "--crop-centres", "classes"], 2, "soft labels need a family whose loss takes them"),
    (["--family", "diffusion", "--soft-labels", "--crop", "32", "--roi", "32"], 2, "--crop-centres classes"),
])
def test_impossible_training_settings_fail_before_training(tmp_path, tiny_dataset, args, code, words):
    run = tessera("train", str(tiny_dataset), "-o", str(tmp_path / "m"), "--name", "x", "--iterations", "1", *args)
    assert run.returncode == code, run.stderr
    assert words in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "m" / "model.pt").exists()


def test_train_and_segment_with_the_diffusion_family(tmp_path, tiny_dataset):
    """DDPM training through the same trainer, and the sampler through the same pipeline: a mask, the
    uncertainty maps on the source grid and the sampler settings in the report."""
    out = tmp_path / "diffusion"
    run = tessera("train", str(tiny_dataset), "-o", str(out), "--name", "tiny-diffusion", "--family", "diffusion",
                  "--unet-channels", "8,16", "--prediction", "sample", "--sampling-steps", "2", "--members", "2",
                  "--iterations", "2", "--validate-every", "2", "--validation-cases", "1", "--crop", "32",
                  "--roi", "32", "--spacing", "5", "--device", "cpu", "--keep-largest", "1,5",
                  "--attention-levels", "0,1", "--mirror-axes", "0", "--soft-labels", "--crop-centres", "classes")
    assert run.returncode == 0, run.stderr
    manifest = load_manifest(out / "manifest.json")
    assert manifest.training["config"]["soft_labels"] is True
    assert manifest.family == "diffusion" and manifest.network["prediction_type"] == "sample"
    assert manifest.inference.mirror_axes == (0,) and manifest.training["config"]["mirror_axes"] == [0]
    assert manifest.network["attention_levels"] == [False, True]
    assert json.loads((out / "manifest.json").read_text())["keep_largest_component"] == [1, 5]
    source = tiny_dataset / "imagesTr" / "p0.nii.gz"
    segmented = tessera("segment", str(source), "-o", str(tmp_path / "seg"), "--model", str(out / "manifest.json"))
    assert segmented.returncode == 0, segmented.stderr
    case = tmp_path / "seg" / "p0"
    uncertainty = nib.load(case / "uncertainty.nii.gz")
    assert uncertainty.shape == (*nib.load(source).shape, 2 * 5)  # std and entropy per foreground class
    np.testing.assert_allclose(uncertainty.affine, nib.load(source).affine, atol=1e-6)
    values = np.asarray(uncertainty.dataobj)
    assert values.min() >= 0 and values[..., :5].max() <= 0.5 and values[..., 5:].max() <= 1.0
    report = json.loads((case / "report.json").read_text())
    runtime = report["settings"]["network_runtime"]
    assert runtime["sampler"]["steps"] == 2 and runtime["sampler"]["members"] == 2 and runtime["forwards"] > 0
    assert runtime["mirror_axes"] == [0]  # the second member saw the image mirrored left-right
    assert runtime["uncertainty_channels"][0] == "std_liver"
    assert "uncertainty.nii.gz" in report["outputs"]
    stats = json.loads((case / "stats.json").read_text())["labels"]
    assert all("uncertainty_mean" in label for label in stats)
    assert set(runtime["boundary_uncertainty"]) == {"liver", "spleen", "kidney_left", "kidney_right", "spine"}
    again = tessera("segment", str(source), "-o", str(tmp_path / "seg2"), "--model", str(out / "manifest.json"),
                    "--steps", "1", "--members", "3", "--seed", "4", "--format", "nifti")
    assert again.returncode == 0, again.stderr
    sampler = json.loads((tmp_path / "seg2" / "p0" / "report.json").read_text())["settings"]["network_runtime"]
    assert (sampler["sampler"]["steps"], sampler["sampler"]["members"], sampler["sampler"]["seed"]) == (1, 3, 4)
    truth = tmp_path / "truth"
    truth.mkdir()
    (truth / "p0.nii.gz").write_bytes((tiny_dataset / "labelsTr" / "p0.nii.gz").read_bytes())
    scored = tessera("evaluate", "--pred", str(tmp_path / "seg"), "--truth", str(truth))
    assert scored.returncode == 0, scored.stderr
    metrics = json.loads((tmp_path / "seg" / "metrics.json").read_text())
    ranking = metrics["uncertainty"]
    assert ranking["cases"] == 1 and ranking["voxels"] == int(np.prod(nib.load(source).shape))
    assert 0.0 <= ranking["auroc_wrong_vs_right"] <= 1.0 and "uncertainty AUROC" in scored.stdout
    refused = tessera("segment", str(source), "-o", str(tmp_path / "seg3"), "--model", str(out / "manifest.json"),
                      "--steps", "0")
    assert refused.returncode == 2 and "SAMPLING_INVALID" in refused.stderr


def test_sampling_options_are_checked_and_refused_for_families_that_do_not_sample(tiny_model):
    from models.families import checked_sampling, get_family
    from pipelines.errors import UsageError
    from pipelines.inference import Predictor

    diffusion = get_family("diffusion")
    assert checked_sampling(diffusion, "d", {}, {"steps": 3, "members": 2, "seed": 9}) == \
        {"steps": 3, "members": 2, "seed": 9}
    for run in ({"steps": 0}, {"steps": 1001}, {"members": 65}, {"seed": -1}, {"steps": 2.5}, {"eta": 1}):
        with pytest.raises(UsageError) as info:
            checked_sampling(diffusion, "d", {}, run)
        assert info.value.code == "SAMPLING_INVALID"
    with pytest.raises(UsageError) as info:
        Predictor(tiny_model, device="cpu", sampling={"steps": 2})
    assert info.value.code == "SAMPLING_NOT_SUPPORTED" and "tiny" in info.value.message
    assert Predictor(tiny_model, device="cpu").with_sampling(None).sampling == {}


def test_auroc_oracles():
    from pipelines.evaluation import auroc

    wrong = np.array([0, 0, 1, 1], bool)
    assert auroc(np.array([0.1, 0.2, 0.8, 0.9]), wrong) == 1.0  # every wrong voxel above every right one
    assert auroc(np.array([0.9, 0.8, 0.2, 0.1]), wrong) == 0.0
    assert auroc(np.zeros(4), wrong) == 0.5  # no ranking at all: ties count half
    assert auroc(np.array([0.1, 0.5, 0.5, 0.9]), wrong) == pytest.approx(0.875)
    assert auroc(np.ones(3), np.zeros(3, bool)) is None


def test_soft_labels_are_per_class_fractions_and_the_diffusion_loss_takes_them():
    """Soft labels: one-hot, resampled trilinearly to a coarser grid, padded, background completed: fractions in
    [0, 1] that sum to 1 everywhere (padding included), partial at boundaries, and where a voxel is wholly one
    class it is the nearest-neighbour label's class; the diffusion loss of an exact one-hot label equals that of
    the integer label it came from (same noise)."""
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Compose

    from models.diffusion.network import build_denoiser
    from models.diffusion.training import diffusion_loss
    from models.manifest import IntensitySpec, PreprocessingSpec
    from pipelines.preprocessing import training_transforms
    from pipelines.training import model_grid_transforms

    label = torch.zeros(1, 24, 24, 24)
    label[0, 8:15, 6:14, 6:14] = 1  # boundaries between the 2.5 mm grid's points
    label[0, 17:21, 4:9, 10:15] = 2
    spec = PreprocessingSpec(orientation="RAS", spacing=(2.5, 2.5, 2.5), intensity=IntensitySpec(kind="none"))
    item = {"image": MetaTensor(torch.rand(1, 24, 24, 24)), "label": MetaTensor(label.clone())}
    soft = Compose(model_grid_transforms(spec, ("image", "label"), (12, 12, 12), soft_classes=3))(item)["label"]
    fractions = torch.as_tensor(soft)
    assert fractions.shape[0] == 3 and fractions.shape[1:] == (12, 12, 12)
    assert float(fractions.min()) >= 0 and float(fractions.max()) <= 1
    torch.testing.assert_close(fractions.sum(0), torch.ones(12, 12, 12))
    partial = (fractions[1] > 0.01) & (fractions[1] < 0.99)
    assert partial.any() and float(fractions[1].max()) == 1.0  # a boundary within voxels, a core that is whole
    nearest = torch.as_tensor(Compose(training_transforms(spec, ("image", "label")))(
        {"image": MetaTensor(torch.rand(1, 24, 24, 24)), "label": MetaTensor(label.clone())})["label"][0]).long()
    inside = fractions[:, 1:11, 1:11, 1:11]  # the resampled grid is 10^3, then padded by one on each side
    whole = inside.max(0).values == 1  # voxels wholly of one class: the nearest label agrees
    assert whole.sum() > 500 and torch.equal(inside.argmax(0)[whole], nearest[whole])

    network = build_denoiser(1, 3, {"channels": [8, 16], "prediction_type": "sample"})
    image = torch.rand(2, 1, 16, 16, 16)
    integers = torch.randint(0, 3, (2, 1, 16, 16, 16)).float()
    one_hot = torch.nn.functional.one_hot(integers[:, 0].long(), 3).permute(0, 4, 1, 2, 3).float()
    settings = {"prediction_type": "sample"}
    torch.manual_seed(3)
    from_integers = diffusion_loss(network, image, integers, settings)
    torch.manual_seed(3)
    from_one_hot = diffusion_loss(network, image, one_hot, settings)
    assert torch.equal(from_integers, from_one_hot)
