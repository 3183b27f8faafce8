"""mamba_ssm's own reference code, for parity tests and benchmarks, also where its CUDA build is missing.

``mamba_ssm.ops.selective_scan_interface`` imports its compiled ``selective_scan_cuda`` and triton's layer norm
unconditionally, so a CPU install (``MAMBA_SKIP_CUDA_BUILD=TRUE``) cannot import its pure-torch
``selective_scan_ref`` or its ``Mamba`` module (and the package's ``__init__`` imports triton through Mamba2).
:func:`mamba_reference` imports the two modules it needs with those stood in for and the package's ``__init__``
skipped, then removes every module it added from ``sys.modules`` again (so nothing else ever sees the
stand-ins: :func:`models.mamba_clinix.scan.cuda_kernel` is unaffected). The returned ``Mamba`` runs its slow path
with ``selective_scan_ref`` in place of the CUDA scan.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class MambaReference:
    version: str
    selective_scan_ref: Callable[..., Any]
    Mamba: type  # mamba_ssm.modules.mamba_simple.Mamba, use_fast_path=False runs on any device


def mamba_reference() -> MambaReference | None:
    """mamba_ssm's reference scan and Mamba module, or ``None`` when mamba_ssm is not installed."""
    spec = importlib.util.find_spec("mamba_ssm")
    if spec is None or not spec.submodule_search_locations:
        return None
    before = set(sys.modules)
    # the package without its __init__ (which imports every model, and triton with them)
    package = types.ModuleType("mamba_ssm")
    package.__path__ = list(spec.submodule_search_locations)
    stand_ins = {"mamba_ssm": package, "selective_scan_cuda": types.ModuleType("selective_scan_cuda")}
    layer_norm = types.ModuleType("mamba_ssm.ops.triton.layer_norm")
    layer_norm._layer_norm_fwd = None  # type: ignore[attr-defined]
    if importlib.util.find_spec("triton") is None:
        stand_ins["mamba_ssm.ops.triton.layer_norm"] = layer_norm
    try:
        for name, module in stand_ins.items():
            sys.modules.setdefault(name, module)
        from importlib.metadata import version

        interface = importlib.import_module("mamba_ssm.ops.selective_scan_interface")
        simple = importlib.import_module("mamba_ssm.modules.mamba_simple")
        setattr(simple, "selective_scan_fn", interface.selective_scan_ref)  # noqa: B010 - the slow path's scan, pure torch
        return MambaReference(version("mamba_ssm"), interface.selective_scan_ref, simple.Mamba)
    except Exception:  # an install we cannot read: behave as if it were absent
        return None
    finally:
        for name in set(sys.modules) - before:
            del sys.modules[name]
