"""Tessera's selective-scan backends vs mamba_ssm's pure-torch reference ``selective_scan_ref``.

Mamba-sized inputs (batch 1, d_inner 512, state 16; delta through softplus with a bias, A = -exp(A_log) with
mamba_ssm's initialisation, D and a z gate) at L = 512, 4096 and 32768, forward and forward+backward. The
reference is mamba_ssm's own function (installed without its CUDA build; see models/mamba_clinix/reference.py);
without mamba_ssm the script stops. Each timing is the best of --repeats runs (fewer at L = 32768), every backend
and the reference interleaved in one process; the ratio is reference seconds / backend seconds (> 1: faster than
the reference). max_abs_diff compares outputs (and, for forward+backward, the gradients of u and delta) with the
reference's.

    python bench/scan.py [--lengths 512,4096,32768] [--repeats 3] [--output bench/results/scan_cpu-2core.json]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import emit  # noqa: E402

from models.mamba_clinix.reference import mamba_reference  # noqa: E402
from models.mamba_clinix.scan import cuda_kernel, selective_scan  # noqa: E402


def make_inputs(length: int, dim: int = 512, state: int = 16, device: str = "cpu") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(length)
    dt = torch.exp(torch.rand(dim, generator=g) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
    tensors = {
        "u": torch.randn(1, dim, length, generator=g),
        "delta": torch.randn(1, dim, length, generator=g) * 0.5,
        "A": -torch.arange(1, state + 1, dtype=torch.float32).repeat(dim, 1),
        "B": torch.randn(1, state, length, generator=g),
        "C": torch.randn(1, state, length, generator=g),
        "D": torch.ones(dim),
        "z": torch.randn(1, dim, length, generator=g),
        "delta_bias": dt + torch.log(-torch.expm1(-dt)),
    }
    return {k: v.to(device) for k, v in tensors.items()}


def run_once(fn: Any, inputs: dict[str, torch.Tensor], backward: bool) -> tuple[float, list[torch.Tensor]]:
    leaves = {k: v.clone().requires_grad_(backward and k in ("u", "delta")) for k, v in inputs.items()}
    synchronise = torch.cuda.synchronize if inputs["u"].is_cuda else (lambda: None)
    synchronise()
    start = time.perf_counter()
    with torch.set_grad_enabled(backward):
        y = fn(leaves)
        if backward:
            y.backward(torch.ones_like(y))
    synchronise()
    seconds = time.perf_counter() - start
    results = [y.detach()]
    if backward:
        results += [leaves["u"].grad, leaves["delta"].grad]  # type: ignore[list-item]
    return seconds, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="512,4096,32768")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--reference-backward-max-L", type=int, default=4096,
                        help="longest L at which the reference's backward is timed (it indexes inside its loop: "
                             "about 2 s at L = 512 on 2 cores and minutes at 4096; hours at 32768, where our "
                             "backends are compared with the sequential one instead)")
    parser.add_argument("--output", default=None, help="also write the JSON here")
    args = parser.parse_args()
    backends = ("chunked", "cuda") if args.device == "cuda" and cuda_kernel() else \
        ("chunked",) if args.device == "cuda" else ("sequential", "chunked")
    reference = mamba_reference()
    if reference is None:
        sys.exit("mamba_ssm is not installed: make setup installs it (MAMBA_SKIP_CUDA_BUILD=TRUE)")
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")

    def call_reference(t: dict[str, torch.Tensor]) -> torch.Tensor:
        return reference.selective_scan_ref(*(t[k] for k in names), delta_softplus=True)

    def call_backend(backend: str) -> Any:
        return lambda t: selective_scan(**{k: t[k] for k in names}, delta_softplus=True, backend=backend)

    runners = {"reference": call_reference, **{b: call_backend(b) for b in backends}}
    cases = []
    for length in (int(v) for v in args.lengths.split(",")):
        inputs = make_inputs(length, device=args.device)
        for backward in (False, True):
            with_reference = not backward or length <= args.reference_backward_max_L
            # the reference's backward takes minutes from L = 4096 on: once is enough there
            repeats = 1 if length > 8192 or (backward and length >= 4096) else args.repeats
            chosen = {k: v for k, v in runners.items() if with_reference or k != "reference"}
            best: dict[str, float] = {}
            outputs: dict[str, list[torch.Tensor]] = {}
            for _ in range(repeats):
                for name, fn in chosen.items():
                    seconds, outputs[name] = run_once(fn, inputs, backward)
                    best[name] = min(best.get(name, math.inf), seconds)
            baseline = "reference" if with_reference else backends[0]
            row: dict[str, Any] = {"L": length, "mode": "forward+backward" if backward else "forward",
                                   "repeats": repeats, "reference_s": round(best["reference"], 4)
                                   if with_reference else None, "differences_against": baseline, "backends": {}}
            for name in backends:
                diffs = [float((a - b).abs().max()) for a, b in zip(outputs[name], outputs[baseline], strict=True)]
                row["backends"][name] = {
                    "seconds": round(best[name], 4),
                    **({"speedup_vs_reference": round(best["reference"] / best[name], 2)} if with_reference else {}),
                    "max_abs_diff_output": diffs[0],
                    **({"max_abs_diff_grad_u": diffs[1], "max_abs_diff_grad_delta": diffs[2]} if backward else {}),
                }
            row["max_abs_output"] = float(outputs[baseline][0].abs().max())
            print(json.dumps(row), file=sys.stderr)
            cases.append(row)
    result = {
        "benchmark": "selective scan: Tessera backends vs mamba_ssm.selective_scan_ref",
        "reference": f"mamba_ssm {reference.version} selective_scan_ref (pure torch; mamba_ssm installed without its "
                     "CUDA build)",
        "shape": {"batch": 1, "d_inner": 512, "d_state": 16, "B_C": "per step (batch, N, L)"},
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "machine": platform.platform(), "processor": platform.processor(), "cases": cases,
    }
    emit(result, args.output)


if __name__ == "__main__":
    main()
