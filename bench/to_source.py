"""Back to the source grid with many classes: the whole-tensor resample vs Tessera's class-chunked one.

A CT-like source grid (default 256x256x160, 0.8x0.8x1.5 mm, stored LPS; at 512x512x200 the whole-tensor
recipe passed 23 GiB of RSS on a 24 GiB machine and was stopped) goes through ``prepare`` (RAS,
1.5 mm) and random smooth probabilities for ``--classes`` classes (default 105) on the model grid are
mapped back to labels on the source grid two ways, each in a fresh process for its peak RSS:

- ``whole``: ``labels_from_probabilities(mapping.to_source(p))``, the recipe MONAI's ``Invertd`` follows
  (every class resampled at once, then argmax);
- ``chunked``: ``mapping.labels_to_source(p)`` (8 classes at a time, running argmax), what the pipeline
  uses when no probabilities are written.

Prints JSON: seconds, peak RSS increase over a baseline taken once the probabilities exist, and the
fraction of identical labels; ``ratios`` are chunked / whole.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from stitching import MemoryProbe  # noqa: E402  (bench/ is on sys.path as the script's folder)

from models.manifest import IntensitySpec, PreprocessingSpec  # noqa: E402
from pipelines.postprocessing import labels_from_probabilities  # noqa: E402
from pipelines.preprocessing import prepare  # noqa: E402
from pipelines.volume import Volume, VolumeMetadata  # noqa: E402


def _case(shape: tuple[int, int, int], classes: int) -> tuple[Any, torch.Tensor]:
    affine = np.diag([-0.8, -0.8, 1.5, 1.0])  # LPS storage, anisotropic
    volume = Volume(np.zeros(shape, np.float32), affine, VolumeMetadata("bench", "bench"))
    prepared = prepare(volume, PreprocessingSpec(spacing=(1.5, 1.5, 1.5), intensity=IntensitySpec(kind="none")))
    generator = torch.Generator().manual_seed(0)
    coarse = torch.randn(1, classes, *(max(s // 8, 2) for s in prepared.image.shape[1:]), generator=generator)
    scores = torch.nn.functional.interpolate(coarse, size=tuple(prepared.image.shape[1:]), mode="trilinear")[0]
    return prepared.mapping, torch.softmax(scores * 4, dim=0)


def worker(kind: str, shape: tuple[int, int, int], classes: int, out: Path) -> None:
    mapping, probabilities = _case(shape, classes)
    probe = MemoryProbe(torch.device("cpu"))
    probe.start()
    start = time.perf_counter()
    if kind == "whole":
        labels = labels_from_probabilities(mapping.to_source(probabilities), classes)
    else:
        labels = mapping.labels_to_source(probabilities).numpy()
    seconds = time.perf_counter() - start
    np.save(out, labels.astype(np.int16))
    print(json.dumps({"seconds": seconds, **probe.read(), "model_shape": list(probabilities.shape[1:]),
                      "probabilities_bytes": probabilities.numel() * 4}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", choices=("whole", "chunked"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--shape", type=int, nargs=3, default=(256, 256, 160))
    parser.add_argument("--classes", type=int, default=105)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/tessera-bench-to-source"))
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    shape = (args.shape[0], args.shape[1], args.shape[2])
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.worker:
        worker(args.worker, shape, args.classes, args.workdir / f"{args.worker}.npy")
        return 0
    runs: dict[str, Any] = {}
    for kind in ("whole", "chunked"):
        done = subprocess.run([sys.executable, __file__, "--worker", kind, "--shape", *map(str, shape), "--classes",
                               str(args.classes), "--workdir", str(args.workdir)], capture_output=True, text=True)
        if done.returncode != 0:
            runs[kind] = {"error": done.stderr.strip().splitlines()[-1:]}
            continue
        runs[kind] = json.loads(done.stdout.strip().splitlines()[-1])
    report: dict[str, Any] = {
        "benchmark": "labels back on the source grid: whole-tensor resample vs class-chunked",
        "platform": {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine()},
        "settings": {"source_shape": list(shape), "classes": args.classes, "source_spacing": [0.8, 0.8, 1.5],
                     "model_spacing": [1.5, 1.5, 1.5], "chunk": 8},
        "runs": runs,
    }
    if all("seconds" in runs.get(k, {}) for k in ("whole", "chunked")):
        whole, chunked = np.load(args.workdir / "whole.npy"), np.load(args.workdir / "chunked.npy")
        report["labels_identical_fraction"] = float((whole == chunked).mean())
        report["ratios"] = {
            "time": runs["chunked"]["seconds"] / runs["whole"]["seconds"],
            "peak_memory": runs["chunked"]["peak_rss_increase_bytes"] / runs["whole"]["peak_rss_increase_bytes"]}
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
