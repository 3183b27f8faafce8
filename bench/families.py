"""Size and cost of each segmenter family: parameters, MACs and CPU forward time for one window.

For each family at its demo settings (the shipped phantom model's manifest, at its roi) and at a 96^3 window
with the reference settings (Swin-UNETR feature size 48, MONAI's BTCV bundle; MambaClinix base 32 / max 320, the
paper's nnU-Net plan): parameters, multiply-accumulates of one forward (``torch.utils.flop_counter``: convolutions,
matmuls and attention; FLOPs / 2; elementwise work such as the selective scan's recurrence is not counted) and
the best of --repeats CPU forward times for a batch of one window. Prints JSON.

    python bench/families.py [--repeats 2] [--skip-96] [--output bench/results/families_cpu-2core.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import emit  # noqa: E402

from models.manifest import manifest_from_dict  # noqa: E402
from models.networks import build_network  # noqa: E402
from models.registry import resolve_model  # noqa: E402

DEMOS = {"swin_unetr": "swin-unetr-phantom", "mamba_clinix": "mamba-clinix-phantom"}
REFERENCE_96 = {
    "swin_unetr": {"feature_size": 48},
    "mamba_clinix": {"base_channels": 32, "max_channels": 320},
}


def measure(network: torch.nn.Module, in_channels: int, roi: tuple[int, int, int], repeats: int) -> dict[str, Any]:
    network.eval()
    x = torch.randn(1, in_channels, *roi)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        network(x)
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            network(x)
            times.append(time.perf_counter() - start)
    return {
        "roi": list(roi),
        "parameters_M": round(sum(p.numel() for p in network.parameters()) / 1e6, 3),
        "gmac": round(counter.get_total_flops() / 2 / 1e9, 2),
        "cpu_forward_s": round(min(times), 3),
        "cpu_forward_runs_s": [round(t, 3) for t in times],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-96", action="store_true", help="only the demo settings")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    rows = []
    for family, model in DEMOS.items():
        manifest = resolve_model(model)
        network = build_network(manifest)
        row = {"family": family, "settings": "demo", "model": model, "network": manifest.network,
               **measure(network, len(manifest.channels), manifest.inference.roi_size, args.repeats)}
        print(json.dumps(row), file=sys.stderr)
        rows.append(row)
        if args.skip_96:
            continue
        data = manifest.to_json()
        data.update(network=REFERENCE_96[family], inference={**data["inference"], "roi_size": [96, 96, 96]})
        reference = manifest_from_dict(data)
        torch.manual_seed(0)
        row = {"family": family, "settings": "reference at 96^3", "network": reference.network,
               "out_channels": reference.num_classes,
               **measure(build_network(reference), len(reference.channels), (96, 96, 96), 1)}
        print(json.dumps(row), file=sys.stderr)
        rows.append(row)
    result = {"benchmark": "segmenter families: size and one-window CPU forward", "threads": torch.get_num_threads(),
              "torch": torch.__version__, "machine": platform.platform(), "rows": rows}
    emit(result, args.output)


if __name__ == "__main__":
    main()
