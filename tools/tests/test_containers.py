"""The Dockerfiles under containers/ cannot be built here (no Docker, no NGC access), so this checks what can rot
silently: each image installs exactly its bidir packages, from wheels built from this repo, on a pinned NVIDIA base
of the right kind, with torch / onnxruntime pins that agree with constraints.txt, and an entrypoint that exists in
the installed packages' metadata."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[2]
CONTAINERS = ROOT / "containers"

# image -> (bidir packages it installs, NVIDIA base image repository)
EXPECTED = {
    "train": ({"core", "train"}, "nvcr.io/nvidia/pytorch"),
    "export": ({"core", "export"}, "nvcr.io/nvidia/tensorrt"),
    "serve": ({"core", "serve"}, "nvcr.io/nvidia/tensorrt"),
    "full": ({"core", "train", "export", "serve"}, "nvcr.io/nvidia/pytorch"),
}


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _args(instructions) -> dict[str, str]:
    return dict(a.split("=", 1) for op, a in instructions if op == "ARG" and "=" in a)


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.strip().lower()] = version.strip()
    return pins


def _project(name: str) -> dict:
    return tomllib.loads((ROOT / "packages" / name / "pyproject.toml").read_text())["project"]


def test_one_dockerfile_per_image():
    assert {p.name.removesuffix(".Dockerfile") for p in CONTAINERS.glob("*.Dockerfile")} == set(EXPECTED)


@pytest.mark.parametrize("image", sorted(EXPECTED))
def test_installs_exactly_its_packages(image):
    packages, base_repo = EXPECTED[image]
    steps = _instructions(CONTAINERS / f"{image}.Dockerfile")
    args = _args(steps)

    base = args["BASE"]
    repo, _, tag = base.partition(":")
    assert repo == base_repo, f"{image}: base {base}"
    assert re.fullmatch(r"\d{2}\.\d{2}-py3", tag), f"{image}: base image tag not pinned: {base}"
    assert all(a == "${BASE}" for op, a in steps if op == "FROM" and not a.startswith("${BASE} AS")), image

    copied = {m for op, a in steps if op == "COPY" for m in re.findall(r"packages/(\w+) ", a + " ")}
    assert copied <= packages and (copied == packages or "packages packages" in " ".join(a for _, a in steps))
    runs = " ".join(a for op, a in steps if op == "RUN")
    built = set(re.findall(r"\./packages/(\w+)", runs))
    installed = set(re.findall(r"/wheels/bidir_(\w+)-\*\.whl", runs))
    assert built == packages, f"{image}: builds wheels for {sorted(built)}"
    assert installed == packages, f"{image}: installs {sorted(installed)}"
    # Nothing bidir comes from an index: only the wheels built from this checkout.
    assert not re.search(r"install[^&]*\sbidir-", runs), image


@pytest.mark.parametrize("image", sorted(EXPECTED))
def test_pins_agree_with_constraints(image):
    pins = _pins()
    args = _args(_instructions(CONTAINERS / f"{image}.Dockerfile"))
    if "TORCH" in args:  # images without torch of their own take the project's pinned torch
        assert args["TORCH"] == f"torch=={pins['torch']}"
    if "ORT_GPU" in args:  # the GPU build replaces the CPU onnxruntime the package metadata pulls in
        name, version = args["ORT_GPU"].split("==")
        assert name == "onnxruntime-gpu" and version.split(".")[:1] == pins["onnxruntime"].split(".")[:1]


@pytest.mark.parametrize("image", sorted(EXPECTED))
def test_entrypoint_exists(image):
    packages, _ = EXPECTED[image]
    steps = _instructions(CONTAINERS / f"{image}.Dockerfile")
    argv = [w for op, a in steps if op in ("ENTRYPOINT", "CMD") for w in json.loads(a)]
    scripts = {s for p in packages for s in _project(p).get("scripts", {})}
    if argv[0] == "torchrun":
        module = argv[argv.index("-m") + 1]
        assert module.removeprefix("bidir_") in packages, f"{image}: torchrun -m {module}"
        assert (ROOT / "packages" / module.removeprefix("bidir_") / "src" / module / "__main__.py").is_file()
    elif argv[0] != "bash":
        assert argv[0] in scripts, (
            f"{image}: entrypoint {argv[0]} is not a console script of {sorted(packages)}"
        )
