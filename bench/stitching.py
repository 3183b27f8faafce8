"""Tessera's sliding-window engine vs MONAI's ``sliding_window_inference``: stitching time, peak memory, parity.

Both engines see the same grid (roi 96^3, overlap 0.5, Gaussian, sw_batch_size 2 by default), the same predictor
and the same input. For each run we time the whole call (wall), the time spent inside the predictor (the predictor
is wrapped and its calls timed with ``time.perf_counter``; on CUDA with CUDA events, which add no synchronisation),
and call the rest stitching (wall - predictor). MONAI returns blended logits; its "labels" path is
``argmax(dim=1)`` of them and its "probabilities" path ``softmax(dim=1)``, and that post-processing is part of its
wall and stitching time, because Tessera's engine returns labels / probabilities directly.

Every run executes in a fresh child process (this script re-invoked with a hidden ``--worker`` flag), so one
engine's allocations cannot hide the other's. In the child, after imports, after building the model and the input,
and after one untimed warm-up call on a roi-sized input (``--no-warmup`` to skip; it stands for a service that has
already served a volume, so per-roi caches are warm but the grid is new), the peak-RSS counter is reset
(``/proc/self/clear_refs``) and the current RSS taken as the baseline; the peak RSS increase is then the peak
(``VmHWM`` / ``ru_maxrss``) minus that baseline. Where the counter cannot be reset, it falls back to
``ru_maxrss`` after - ``ru_maxrss`` before. On CUDA, ``torch.cuda.max_memory_allocated`` above the allocated
baseline is reported too. Runs are interleaved (repeat 0 of every variant, then repeat 1, ...; the order flips
every repeat) so that noise on a shared machine hits both engines alike; we report the best of N and all runs.

Cases (``--cases``, comma separated):
  conv14   1x1x1 Conv3d 1 -> 14 classes on 192x192x128: Tessera "probabilities" and "labels" vs MONAI.
  conv105  the same with 105 classes on 256^3: Tessera "labels" (planner default) and with fp16 accumulation
           (``--conv105-fp32``: also with fp32 accumulation).
  swin     MONAI SwinUNETR (depths 1,1,1,1; feature size 12 on CPU, 48 on CUDA) on 128x128x96: the end-to-end
           share of stitching for both engines.

    python bench/stitching.py [--cases conv14,conv105,swin] [--device auto|cpu|cuda] [--repeats 2] [--quick]

Prints one JSON document on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
ENGINE_MODULE = "pipelines.inference.sliding_window"


# --------------------------------------------------------------------------------------------- case definitions


@dataclasses.dataclass
class Variant:
    """One way of running an engine on a case (its key in the JSON, and the engine's options)."""

    key: str
    output: str  # "labels" | "probabilities"
    accumulate_dtype: str | None = None  # Tessera only: None (planner) | "float16" | "float32"


@dataclasses.dataclass
class Case:
    name: str
    model: str  # "conv" | "swin"
    classes: int
    shape: tuple[int, int, int]
    roi: tuple[int, int, int]
    feature_size: int = 0
    tessera: list[Variant] = dataclasses.field(default_factory=list)
    monai: list[str] = dataclasses.field(default_factory=list)  # post-processing paths: "labels", "probabilities"
    # which MONAI path each Tessera variant is compared with (same output)
    compare: dict[str, str] = dataclasses.field(default_factory=dict)


def build_cases(args: argparse.Namespace, device: str) -> dict[str, Case]:
    quick = args.quick

    def roi_of(default: int) -> tuple[int, int, int]:
        roi = list(args.roi) if args.roi else [default]
        return (roi[0], roi[1], roi[2]) if len(roi) == 3 else (roi[0], roi[0], roi[0])

    roi3 = roi_of(32 if quick else 96)
    conv105 = [Variant("labels", "labels"), Variant("labels_fp16", "labels", "float16")]
    if args.conv105_fp32:
        conv105.append(Variant("labels_fp32", "labels", "float32"))
    cases = {
        "conv14": Case(
            name="conv14", model="conv", classes=14, roi=roi3,
            shape=(80, 80, 64) if quick else (192, 192, 128),
            tessera=[Variant("probabilities", "probabilities"), Variant("labels", "labels")],
            monai=["labels", "probabilities"],
            compare={"probabilities": "probabilities", "labels": "labels"},
        ),
        "conv105": Case(
            name="conv105", model="conv", classes=105, roi=roi3,
            shape=(96, 96, 64) if quick else (256, 256, 256),
            tessera=conv105, monai=["labels"], compare={v.key: "labels" for v in conv105},
        ),
        "swin": Case(
            name="swin", model="swin", classes=14, roi=roi_of(64 if quick else 96),  # SwinUNETR needs roi >= 64
            shape=(80, 80, 64) if quick else (128, 128, 96),
            feature_size=args.swin_feature_size or (48 if device == "cuda" else 12),
            tessera=[Variant("labels", "labels"), Variant("probabilities", "probabilities")],
            monai=["labels", "probabilities"],
            compare={"labels": "labels", "probabilities": "probabilities"},
        ),
    }
    return cases


# --------------------------------------------------------------------------------------------- measurement helpers


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss_bytes() -> int | None:
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def hwm_rss_bytes() -> int | None:
    kib = _status_kib("VmHWM")
    return None if kib is None else kib * 1024


def ru_maxrss_bytes() -> int:
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(value) if sys.platform == "darwin" else int(value) * 1024  # bytes on macOS, KiB on Linux


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    hwm, rss = hwm_rss_bytes(), current_rss_bytes()
    return hwm is not None and rss is not None and hwm <= rss + (4 << 20)


class MemoryProbe:
    """Peak host RSS (and CUDA allocation) increase over a baseline taken at ``start``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.method = ""
        self.baseline = 0
        self.ru_before = 0
        self.cuda_baseline = 0

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            self.cuda_baseline = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.ru_before = ru_maxrss_bytes()
        if reset_peak_rss():
            self.method = "clear_refs+VmHWM"
            self.baseline = current_rss_bytes() or 0
        else:
            self.method = "ru_maxrss"
            self.baseline = self.ru_before

    def read(self) -> dict[str, Any]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        peak = ru_maxrss_bytes()
        if self.method == "clear_refs+VmHWM":
            peak = max(hwm_rss_bytes() or 0, peak)
        result: dict[str, Any] = {
            "peak_rss_increase_bytes": max(0, peak - self.baseline),
            "rss_baseline_bytes": self.baseline,
            "rss_method": self.method,
            "ru_maxrss_before_bytes": self.ru_before,
            "ru_maxrss_after_bytes": ru_maxrss_bytes(),
        }
        if self.device.type == "cuda":
            result["peak_cuda_increase_bytes"] = max(0, torch.cuda.max_memory_allocated(self.device)
                                                     - self.cuda_baseline)
        return result

    def held(self) -> dict[str, Any]:
        """Memory still held over the baseline once the caller has dropped every output (caches, pools)."""
        gc.collect()
        result: dict[str, Any] = {"rss_held_after_return_bytes": (current_rss_bytes() or 0) - self.baseline}
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            result["cuda_held_after_return_bytes"] = torch.cuda.memory_allocated(self.device) - self.cuda_baseline
        return result

    def reset_cuda_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)


class TimedPredictor:
    """Wraps the predictor and sums the time spent inside it (CUDA events on a GPU: no extra synchronisation)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], device: torch.device) -> None:
        self.fn = fn
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.cpu_seconds = 0.0
        self.calls = 0
        self.patches = 0
        self.events: list[tuple[Any, Any]] = []

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.calls += 1
        self.patches += int(x.shape[0])
        if self.device.type == "cuda":
            start_event = torch.cuda.Event(enable_timing=True)
            end_event = torch.cuda.Event(enable_timing=True)
            start_event.record()
            y = self.fn(x, *args, **kwargs)
            end_event.record()
            self.events.append((start_event, end_event))
            return y
        start = time.perf_counter()
        y = self.fn(x, *args, **kwargs)
        self.cpu_seconds += time.perf_counter() - start
        return y

    def seconds(self) -> float:
        """Total predictor time; on CUDA call after synchronising."""
        if self.device.type == "cuda":
            return sum(a.elapsed_time(b) for a, b in self.events) / 1000.0
        return self.cpu_seconds


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------- worker side


def build_model(spec: dict[str, Any], device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    model: torch.nn.Module
    if spec["model"] == "conv":
        model = torch.nn.Conv3d(1, spec["classes"], kernel_size=1)
    else:
        from monai.networks.nets import SwinUNETR

        model = SwinUNETR(in_channels=1, out_channels=spec["classes"], feature_size=spec["feature_size"],
                          depths=(1, 1, 1, 1), spatial_dims=3)
    return model.to(device).eval()


def build_input(shape: list[int], device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn((1, 1, *shape), generator=generator).to(device)


def plan_as_dict(plan: Any) -> Any:
    if plan is None:
        return None
    if dataclasses.is_dataclass(plan) and not isinstance(plan, type):
        raw: Any = dataclasses.asdict(plan)
    else:
        raw = repr(plan)
    return json.loads(json.dumps(raw, default=str))


def _labels_for_saving(labels: torch.Tensor) -> torch.Tensor:
    labels = labels.detach().cpu()
    return labels.to(torch.int16) if labels.dtype not in (torch.uint8, torch.int16) else labels


def run_tessera(spec: dict[str, Any], model: torch.nn.Module, inputs: torch.Tensor,
                device: torch.device) -> dict[str, Any]:
    import importlib

    engine = importlib.import_module(ENGINE_MODULE)
    swi = engine.sliding_window_inference
    dtype = {None: None, "float16": torch.float16, "float32": torch.float32}[spec["accumulate_dtype"]]
    kwargs: dict[str, Any] = dict(overlap=spec["overlap"], mode=spec["mode"], sigma_scale=spec["sigma_scale"],
                                  output=spec["output"], accumulate_dtype=dtype)
    if spec["memory_budget_bytes"] is not None:
        kwargs["memory_budget_bytes"] = spec["memory_budget_bytes"]
    roi, sw_batch = tuple(spec["roi"]), spec["sw_batch_size"]
    predictor = TimedPredictor(model, device)
    probe = MemoryProbe(device)
    with torch.no_grad():
        if spec["warmup"]:
            swi(build_input(list(roi), device), roi, sw_batch, predictor, **kwargs)
            predictor.reset()
        probe.start()
        start = time.perf_counter()
        out = swi(inputs, roi, sw_batch, predictor, **kwargs)
        synchronize(device)
        wall = time.perf_counter() - start
        memory = probe.read()
    predictor_s = predictor.seconds()
    result: dict[str, Any] = {
        "wall_s": wall, "predictor_s": predictor_s, "stitching_s": wall - predictor_s,
        "predictor_calls": predictor.calls, "patches": predictor.patches, **memory,
        "output_shape": list(out.shape), "output_dtype": str(out.dtype), "output_device": str(out.device),
        "plan": plan_as_dict(getattr(swi, "last_plan", None)), "engine_sha256": engine_sha256(),
    }
    if spec["save_path"]:
        if spec["output"] == "labels":
            torch.save({"labels": _labels_for_saving(out)}, spec["save_path"])
        else:
            probs = out.detach().cpu().float()
            torch.save({"probabilities": probs, "labels": _labels_for_saving(probs.argmax(dim=1))},
                       spec["save_path"])
            del probs
    del out
    result.update(probe.held())
    return result


def run_monai(spec: dict[str, Any], model: torch.nn.Module, inputs: torch.Tensor,
              device: torch.device) -> dict[str, Any]:
    from monai.inferers import sliding_window_inference

    roi, sw_batch = tuple(spec["roi"]), spec["sw_batch_size"]
    kwargs: dict[str, Any] = dict(overlap=spec["overlap"], mode=spec["mode"], sigma_scale=spec["sigma_scale"])
    predictor = TimedPredictor(model, device)
    probe = MemoryProbe(device)
    saved: dict[str, torch.Tensor] = {}
    paths: dict[str, Any] = {}
    with torch.no_grad():
        if spec["warmup"]:
            warm = sliding_window_inference(build_input(list(roi), device), roi, sw_batch, predictor, **kwargs)
            assert isinstance(warm, torch.Tensor)
            warm.argmax(dim=1)
            torch.softmax(warm, dim=1)
            del warm
            predictor.reset()
        probe.start()
        start = time.perf_counter()
        logits = sliding_window_inference(inputs, roi, sw_batch, predictor, **kwargs)
        assert isinstance(logits, torch.Tensor)
        synchronize(device)
        sw_wall = time.perf_counter() - start
        sw_memory = probe.read()
        predictor_s = predictor.seconds()
        # post-processing paths, smallest first; each one's peak includes the logits it starts from
        for path in spec["monai_outputs"]:
            probe.reset_cuda_peak()
            start = time.perf_counter()
            out = logits.argmax(dim=1) if path == "labels" else torch.softmax(logits, dim=1)
            synchronize(device)
            post_s = time.perf_counter() - start
            memory = probe.read()
            if device.type == "cuda":
                memory["peak_cuda_increase_bytes"] = max(memory["peak_cuda_increase_bytes"],
                                                         sw_memory["peak_cuda_increase_bytes"])
            wall = sw_wall + post_s
            paths[path] = {"wall_s": wall, "predictor_s": predictor_s, "stitching_s": wall - predictor_s,
                           "sliding_window_s": sw_wall, "postprocess_s": post_s, **memory,
                           "output_shape": list(out.shape), "output_dtype": str(out.dtype)}
            if spec["save_path"]:
                if path == "labels":
                    saved["labels"] = _labels_for_saving(out)
                else:
                    saved["probabilities"] = out.detach().cpu().float()
            del out
            gc.collect()
    if spec["save_path"]:
        torch.save(saved, spec["save_path"])
    logits_shape = list(logits.shape)
    del logits, saved
    held = probe.held()
    for entry in paths.values():
        entry.update(held)
    return {"paths": paths,
            "sliding_window": {"wall_s": sw_wall, "predictor_s": predictor_s, "stitching_s": sw_wall - predictor_s,
                               **sw_memory},
            "predictor_calls": predictor.calls, "patches": predictor.patches, "output_shape": logits_shape}


def worker_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(os.cpu_count() or 1)
    device = torch.device(spec["device"])
    if spec["engine"] == "monai":
        import monai.inferers  # noqa: F401  (imported before the baseline)
    else:
        import importlib

        importlib.import_module(ENGINE_MODULE)
    model = build_model(spec, device)
    inputs = build_input(spec["shape"], device)
    runner = run_monai if spec["engine"] == "monai" else run_tessera
    result = runner(spec, model, inputs, device)
    Path(spec["result_path"]).write_text(json.dumps(result))


# --------------------------------------------------------------------------------------------- parent side


def launch(spec: dict[str, Any], workdir: Path, tag: str, timeout_s: float) -> dict[str, Any]:
    spec_path, result_path = workdir / f"{tag}.spec.json", workdir / f"{tag}.result.json"
    spec = {**spec, "result_path": str(result_path)}
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path)],
                              cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"worker timed out after {timeout_s:.0f} s"}
    elapsed = time.perf_counter() - start
    if proc.returncode != 0 or not result_path.exists():
        tail = (proc.stderr or "")[-2000:]
        reason = "killed (out of memory?)" if proc.returncode in (-9, 137) else f"exit code {proc.returncode}"
        return {"error": f"worker {reason}", "stderr_tail": tail}
    result: dict[str, Any] = json.loads(result_path.read_text())
    result["process_s"] = elapsed
    return result


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if "error" not in r]
    summary: dict[str, Any] = {"runs": runs}
    if not ok:
        summary["error"] = runs[0].get("error") if runs else "no runs"
        return summary
    for key in ("wall_s", "predictor_s", "stitching_s"):
        summary["best_" + key] = min(r[key] for r in ok)
    summary["stitching_share"] = min(r["stitching_s"] / r["wall_s"] for r in ok)
    summary["peak_rss_increase_bytes"] = max(r["peak_rss_increase_bytes"] for r in ok)
    summary["peak_rss_increase_gib"] = summary["peak_rss_increase_bytes"] / 2**30
    if all("rss_held_after_return_bytes" in r for r in ok):
        summary["rss_held_after_return_gib"] = max(r["rss_held_after_return_bytes"] for r in ok) / 2**30
    if "peak_cuda_increase_bytes" in ok[0]:
        summary["peak_cuda_increase_bytes"] = max(r["peak_cuda_increase_bytes"] for r in ok)
        summary["peak_cuda_increase_gib"] = summary["peak_cuda_increase_bytes"] / 2**30
    return summary


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def parity(tessera_file: Path, monai_file: Path) -> dict[str, Any]:
    if not tessera_file.exists() or not monai_file.exists():
        return {"error": "outputs missing (a run failed)"}
    ours, theirs = torch.load(tessera_file), torch.load(monai_file)
    result: dict[str, Any] = {}
    if "labels" in ours and "labels" in theirs:
        a, b = ours["labels"], theirs["labels"]
        if a.shape != b.shape:
            result["labels_error"] = f"shape {list(a.shape)} vs {list(b.shape)}"
        else:
            result["labels_identical_fraction"] = (a.long() == b.long()).double().mean().item()
    if "probabilities" in ours and "probabilities" in theirs:
        p, q = ours["probabilities"], theirs["probabilities"]
        if p.shape != q.shape:
            result["probabilities_error"] = f"shape {list(p.shape)} vs {list(q.shape)}"
        else:
            diff = (p - q).abs()
            result["probabilities_max_abs_diff"] = diff.max().item()
            result["probabilities_mean_abs_diff"] = diff.mean().item()
            del diff
    return result


def engine_sha256() -> str | None:
    engine_file = REPO_ROOT / (ENGINE_MODULE.replace(".", "/") + ".py")
    return hashlib.sha256(engine_file.read_bytes()).hexdigest() if engine_file.exists() else None


def platform_info(device: str) -> dict[str, Any]:
    import monai

    info: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(), "machine": platform.machine(),
        "processor": platform.processor(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "monai": monai.__version__, "torch_threads": torch.get_num_threads(), "device": device,
    }
    if device == "cuda":
        info["device_name"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
        info["cuda_total_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
    else:
        info["device_name"] = platform.processor() or platform.machine()
    info["engine_sha256"] = engine_sha256()  # the engine is under active development: record what was measured
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
        info["git_commit"] = commit.stdout.strip() or None
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as fh:
            info["mem_total_bytes"] = int(fh.readline().split()[1]) * 1024
    except OSError:
        pass
    return info


def run_case(case: Case, args: argparse.Namespace, device: str, workdir: Path) -> dict[str, Any]:
    base = {"model": case.model, "classes": case.classes, "shape": list(case.shape), "roi": list(case.roi),
            "feature_size": case.feature_size, "overlap": args.overlap, "mode": args.mode,
            "sigma_scale": args.sigma_scale, "sw_batch_size": args.sw_batch_size, "device": device,
            "warmup": not args.no_warmup, "memory_budget_bytes": args.memory_budget_bytes}
    jobs: list[tuple[str, str, dict[str, Any]]] = [("monai", "logits", {"engine": "monai",
                                                                        "monai_outputs": case.monai})]
    for variant in case.tessera:
        jobs.append(("tessera", variant.key, {"engine": "tessera", "output": variant.output,
                                              "accumulate_dtype": variant.accumulate_dtype}))
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {(e, k): [] for e, k, _ in jobs}
    for repeat in range(args.repeats):
        order = jobs if repeat % 2 == 0 else list(reversed(jobs))
        for engine, key, extra in order:
            tag = f"{case.name}-{engine}-{key}-r{repeat}"
            save = workdir / f"{case.name}-{engine}-{key}.pt" if repeat == 0 else None
            print(f"[stitching] {tag} ...", file=sys.stderr, flush=True)
            outcome = launch({**base, **extra, "save_path": str(save) if save else None}, workdir, tag,
                             args.worker_timeout)
            if "error" in outcome:
                print(f"[stitching] {tag}: {outcome['error']}\n{outcome.get('stderr_tail', '')}", file=sys.stderr,
                      flush=True)
            elif engine == "monai":
                print(f"[stitching] {tag}: sliding window {outcome['sliding_window']['wall_s']:.2f} s, predictor "
                      f"{outcome['sliding_window']['predictor_s']:.2f} s, peak +"
                      f"{outcome['sliding_window']['peak_rss_increase_bytes'] / 2**30:.2f} GiB", file=sys.stderr,
                      flush=True)
            else:
                print(f"[stitching] {tag}: wall {outcome['wall_s']:.2f} s, stitching {outcome['stitching_s']:.2f} s, "
                      f"peak +{outcome['peak_rss_increase_bytes'] / 2**30:.2f} GiB", file=sys.stderr, flush=True)
            runs[(engine, key)].append(outcome)

    monai_runs = runs[("monai", "logits")]
    monai_ok = [r for r in monai_runs if "error" not in r]
    monai_summary: dict[str, Any] = {}
    for path in case.monai:
        monai_summary[path] = summarise([r["paths"][path] for r in monai_ok] or
                                        [{"error": monai_runs[0].get("error", "failed")}])
    monai_info = {k: v for k, v in (monai_ok[0] if monai_ok else {}).items() if k in ("patches", "predictor_calls")}
    monai_summary["sliding_window_only"] = summarise([r["sliding_window"] for r in monai_ok] or
                                                     [{"error": "failed"}])

    result: dict[str, Any] = {
        "model": "Conv3d 1x1x1" if case.model == "conv" else f"SwinUNETR fs{case.feature_size} depths (1,1,1,1)",
        "classes": case.classes, "shape": [1, 1, *case.shape], "roi": list(case.roi), "monai": monai_summary,
        "monai_windows": monai_info, "tessera": {}, "ratios_tessera_over_monai": {}, "parity": {}, "plan": {},
    }
    monai_file = workdir / f"{case.name}-monai-logits.pt"
    for variant in case.tessera:
        summary = summarise(runs[("tessera", variant.key)])
        result["tessera"][variant.key] = summary
        ok = [r for r in summary["runs"] if "error" not in r]
        if ok:
            result["plan"][variant.key] = ok[0].get("plan")
        peer = monai_summary.get(case.compare[variant.key], {})
        mem_key = "peak_cuda_increase_bytes" if device == "cuda" else "peak_rss_increase_bytes"
        result["ratios_tessera_over_monai"][variant.key] = {
            "compared_with": f"monai {case.compare[variant.key]}",
            "stitching_time": ratio(summary.get("best_stitching_s"), peer.get("best_stitching_s")),
            "wall_time": ratio(summary.get("best_wall_s"), peer.get("best_wall_s")),
            "peak_memory": ratio(summary.get(mem_key), peer.get(mem_key)),
            "peak_host_rss": ratio(summary.get("peak_rss_increase_bytes"), peer.get("peak_rss_increase_bytes")),
        }
        result["parity"][variant.key] = parity(workdir / f"{case.name}-tessera-{variant.key}.pt", monai_file)
    for reduced in ("labels_fp16", "labels"):
        if reduced in result["tessera"] and "labels_fp32" in result["tessera"]:
            result["parity"][f"{reduced}_vs_tessera_labels_fp32"] = parity(
                workdir / f"{case.name}-tessera-{reduced}.pt", workdir / f"{case.name}-tessera-labels_fp32.pt")
    gc.collect()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cases", default="conv14,conv105,swin")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--roi", type=int, nargs="+", default=None,
                        help="1 or 3 ints (default 96; --quick: 32, swin 64)")
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--mode", default="gaussian")
    parser.add_argument("--sigma-scale", type=float, default=0.125)
    parser.add_argument("--sw-batch-size", type=int, default=2)
    parser.add_argument("--swin-feature-size", type=int, default=None, help="default 12 on CPU, 48 on CUDA")
    parser.add_argument("--conv105-fp32", action="store_true",
                        help="conv105: also run Tessera with accumulate_dtype=torch.float32 (2 more long runs)")
    parser.add_argument("--memory-budget-bytes", type=int, default=None, help="passed to Tessera's engine")
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed roi-sized warm-up call")
    parser.add_argument("--quick", action="store_true", help="small volumes and roi 32: a smoke run")
    parser.add_argument("--worker-timeout", type=float, default=1800.0)
    parser.add_argument("--output", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    if args.worker:
        worker_main(args.worker)
        return

    if args.device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    else:
        device = args.device
    torch.set_num_threads(os.cpu_count() or 1)
    cases = build_cases(args, device)
    selected = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in selected if c not in cases]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {sorted(cases)}")

    document: dict[str, Any] = {
        "benchmark": "stitching: Tessera sliding_window_inference vs MONAI sliding_window_inference",
        "platform": platform_info(device),
        "settings": {"overlap": args.overlap, "mode": args.mode, "sigma_scale": args.sigma_scale,
                     "sw_batch_size": args.sw_batch_size, "repeats": args.repeats, "quick": args.quick,
                     "warmup": not args.no_warmup, "memory_budget_bytes": args.memory_budget_bytes,
                     "process_per_run": True,
                     "stitching_time": "wall - time inside the predictor; MONAI's includes argmax / softmax",
                     "stitching_share": "stitching / wall, the lowest over the runs",
                     "memory": "peak increase over a baseline taken after imports, model, input and warm-up, "
                               "in a fresh process per run; rss_held_after_return: RSS still above that baseline "
                               "once the outputs are dropped (engine caches and buffer pools; also what the "
                               "allocator has not returned to the OS)"},
        "cases": {},
    }
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tessera-stitching-") as tmp:
        for name in selected:
            document["cases"][name] = run_case(cases[name], args, device, Path(tmp))
    document["total_s"] = time.perf_counter() - start
    text = json.dumps(document, indent=2)
    if args.output:
        args.output.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
