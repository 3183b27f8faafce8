"""The MambaClinix-style family: the Mamba layer, HGCN blocks, the stage plan, the network, the family entry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from models.families import FAMILIES, get_family
from models.mamba_clinix.blocks import HGCNBlock, HierarchicalGatedConv
from models.mamba_clinix.mamba import Mamba, MambaMixer
from models.mamba_clinix.network import MambaClinixUNet
from models.mamba_clinix.plan import check_window, order_widths, plan, planned_stages
from models.mamba_clinix.reference import mamba_reference
from models.manifest import manifest_from_dict
from models.networks import build_network
from pipelines.errors import ModelError
from pipelines.phantoms import STRUCTURES

LAYOUT = Path(__file__).parent / "fixtures" / "mamba_ssm_layout_d32.json"
TINY = {"base_channels": 4, "max_channels": 16, "d_state": 4}


def test_unidirectional_mamba_is_causal():
    torch.manual_seed(0)
    layer = Mamba(16, d_state=4).double()
    tokens = torch.randn(1, 40, 16, dtype=torch.float64)
    changed = tokens.clone()
    changed[:, 25] += 1.0
    before, after = layer(tokens), layer(changed)
    assert torch.equal(before[:, :25], after[:, :25])  # nothing before the changed token moves
    assert (before[:, 25:] - after[:, 25:]).abs().amax(-1).min() > 0  # the token itself and later ones do


def test_reversed_direction_sees_the_future():
    torch.manual_seed(0)
    layer = Mamba(16, d_state=4, directions=("forward", "reversed")).double()
    tokens = torch.randn(1, 40, 16, dtype=torch.float64)
    changed = tokens.clone()
    changed[:, 25] += 1.0
    assert not torch.equal(layer(tokens)[:, :25], layer(changed)[:, :25])


def test_mamba_ssm_layout_loads_strictly():
    """Key names and shapes as mamba_ssm.Mamba saves them (fixture written from mamba_ssm 2.3.2)."""
    layout = json.loads(LAYOUT.read_text())
    ours = Mamba(layout["d_model"])
    assert {k: list(v.shape) for k, v in ours.state_dict().items()} == layout["keys"]
    state = {k: torch.randn(shape) for k, shape in layout["keys"].items()}
    ours.load_state_dict(state, strict=True)


def test_extra_directions_have_their_own_parameters():
    names = set(Mamba(32, directions=("forward", "reversed", "slices")).state_dict())
    for suffix in ("_b", "_s"):
        assert {f"conv1d{suffix}.weight", f"x_proj{suffix}.weight", f"dt_proj{suffix}.bias", f"A{suffix}_log",
                f"D{suffix}"} <= names
    with pytest.raises(ModelError, match="scan_directions"):
        Mamba(32, directions=("reversed",))


def test_same_output_as_mamba_ssm_with_its_weights():
    reference = mamba_reference()
    if reference is None:
        pytest.skip("mamba_ssm is not installed (make setup installs it without its CUDA build)")
    torch.manual_seed(0)
    theirs = reference.Mamba(32, use_fast_path=False)
    ours = Mamba(32)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    tokens = torch.randn(2, 300, 32)
    torch.testing.assert_close(ours(tokens), theirs(tokens), rtol=1e-5, atol=1e-6)


def test_slices_direction_follows_the_spatial_shape():
    torch.manual_seed(0)
    layer = Mamba(8, d_state=4, directions=("forward", "slices"))
    out = layer(torch.randn(1, 4 * 3 * 2, 8), spatial_shape=(4, 3, 2))
    assert out.shape == (1, 24, 8)
    with pytest.raises(ValueError, match="spatial shape"):
        layer(torch.randn(1, 24, 8), spatial_shape=(4, 4, 2))


def test_mixer_runs_in_float32_under_autocast():
    torch.manual_seed(0)
    mixer = MambaMixer(8, d_state=4)
    x = torch.randn(1, 8, 4, 4, 4)
    plain = mixer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = mixer(x)
    assert autocast.dtype == torch.float32
    torch.testing.assert_close(autocast, plain, rtol=0, atol=0)


def test_order_widths_and_gating():
    assert order_widths(32, 2) == [8, 16] and order_widths(32, 4) == [2, 4, 8, 16]
    with pytest.raises(ModelError, match="order 4 does not divide 12 channels"):
        order_widths(12, 4)
    torch.manual_seed(0)
    add = HierarchicalGatedConv(16, 3, "add")
    mul = HierarchicalGatedConv(16, 3, "mul")
    mul.load_state_dict(add.state_dict())
    x = torch.randn(1, 16, 4, 4, 4)
    assert not torch.allclose(add(x), mul(x))
    block = HGCNBlock(16, 3)
    assert torch.all(block.gamma == 1e-6) and block(x).shape == x.shape


def test_stage_plan_follows_the_window():
    assert planned_stages((96, 96, 96)) == 5 and planned_stages((128, 128, 128)) == 6
    assert planned_stages((32, 32, 32)) == 4
    reference = plan({}, (96, 96, 96))
    assert reference.channels == (32, 64, 128, 256, 320)
    assert reference.mixers == ("hgcn", "hgcn", "hgcn", "mamba", "mamba") and reference.orders == (2, 3, 4)
    assert reference.drop_path == pytest.approx((0.0, 0.125, 0.25, 0.375, 0.5))
    deep = plan({}, (128, 128, 128))
    first_mamba = deep.mixers.index("mamba")
    assert (128 // 2**first_mamba) ** 3 == 4096  # Mamba never sees more than 4096 tokens


@pytest.mark.parametrize(("settings", "window", "names"), [
    ({"stages": 5}, (96, 96, 40), "(96, 96, 40)"),
    ({"base_channels": 12, "hgcn_orders": [2, 4]}, (32, 32, 32), "order 4 does not divide 24"),
    ({"gating": "max"}, (32, 32, 32), "'max'"),
    ({"depth": 3}, (32, 32, 32), "depth"),
    ({"stages": 1}, (32, 32, 32), "got 1"),
])
def test_impossible_settings_are_manifest_invalid(settings, window, names):
    with pytest.raises(ModelError) as info:
        check_window(window, settings, "roi_size")
    assert info.value.code == "MANIFEST_INVALID" and names in info.value.message


def test_network_outputs_in_eval_and_with_deep_supervision():
    torch.manual_seed(0)
    network = MambaClinixUNet(2, 3, TINY, (32, 32, 32))
    x = torch.randn(1, 2, 32, 32, 16)
    network.eval()
    with torch.no_grad():
        assert network(x).shape == (1, 3, 32, 32, 16)
    network.train()
    outputs = network(x)
    assert [tuple(o.shape[2:]) for o in outputs] == [(32, 32, 16), (16, 16, 8), (8, 8, 4)]


def _manifest(**network):
    return manifest_from_dict({
        "name": "mc", "family": "mamba_clinix", "channels": [{"name": "CT", "modality": "CT"}],
        "labels": [{"value": s.value, "name": s.name} for s in STRUCTURES], "network": network,
        "inference": {"roi_size": 32}, "weights": {"path": "model.pt"},
    })


def test_family_entry_builds_through_the_factory():
    assert "mamba_clinix" in FAMILIES and get_family("mamba_clinix").default_loss == "compound"
    network = build_network(_manifest(**TINY))
    assert isinstance(network, MambaClinixUNet) and network.plan.stages == 4
    with pytest.raises(ModelError) as info:
        build_network(manifest_from_dict({**_manifest(stages=4).to_json(), "inference": {"roi_size": [32, 32, 20]}}))
    assert info.value.code == "MANIFEST_INVALID" and "(32, 32, 20)" in info.value.message
