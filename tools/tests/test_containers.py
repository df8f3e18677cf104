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
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
CONTAINERS = ROOT / "containers"

# image -> (bidir packages it installs, NVIDIA base image repository)
EXPECTED = {
    "train": ({"core", "train"}, "nvcr.io/nvidia/pytorch"),
    "export": ({"core", "export"}, "nvcr.io/nvidia/tensorrt"),
    "serve": ({"core", "serve"}, "nvcr.io/nvidia/tensorrt"),
    "full": ({"core", "train", "export", "serve"}, "nvcr.io/nvidia/pytorch"),
}

# torch.__version__ in each base image, by tag; None: the image has no torch (the Dockerfile installs its TORCH pin).
# NVIDIA's PyTorch release notes give the version per release, e.g. 25.10: "PyTorch container image version 25.10 is
# based on 2.9.0a0+145a3a7bda" (docs.nvidia.com/deeplearning/frameworks/pytorch-release-notes/rel-25-10.html; 25.12:
# rel-25-12.html, 2.10.0a0+b4e4ee81d3); the installed distribution adds NGC's local label (.nv25.10), as its wheel
# name torch-2.9.0a0+145a3a7bda.nv25.10-... shows. The TensorRT images ship TensorRT and its bindings, no torch.
# 25.09 and 25.12 are not used by a Dockerfile: they are what `--build-arg BASE=` would bring (checked too).
BASE_TORCH = {
    "nvcr.io/nvidia/pytorch:25.09-py3": "2.9.0a0+50eac811a6.nv25.09",
    "nvcr.io/nvidia/pytorch:25.10-py3": "2.9.0a0+145a3a7bda.nv25.10",
    "nvcr.io/nvidia/pytorch:25.12-py3": "2.10.0a0+b4e4ee81d3.nv25.12",
    "nvcr.io/nvidia/tensorrt:25.10-py3": None,
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


def _torch_requirement(package: str) -> Requirement | None:
    reqs = [Requirement(r) for r in _project(package)["dependencies"]]
    return next((r for r in reqs if r.name == "torch"), None)


def _admits(package: str, torch_version: str) -> bool:
    """Whether pip keeps an installed torch of this version for this package's requirement.

    NGC's torch builds (2.9.0a0+...) are pre-releases of the next version, so they sort BEFORE it: ">=2.9" excludes
    2.9.0a0 whatever the pre-release rules. Those rules, for what is installed, are pip's: it checks an installed
    version with `specifier.contains(version, prereleases=True)` (pip's resolvelib factory, _get_installed_candidate),
    so ">=2.6" admits 2.9.0a0 although packaging's default (prereleases=None: no pre-release unless the specifier
    names one) would not; that default is what pip applies to candidates from an index. When this is False, pip
    replaces the image's torch from the index, or (train/full pin it with a constraint) fails to resolve.
    """
    Version(torch_version)  # a valid PEP 440 version, local label included
    req = _torch_requirement(package)
    return req is None or req.specifier.contains(torch_version, prereleases=True)


@pytest.mark.parametrize("image", sorted(EXPECTED))
def test_torch_requirements_admit_the_images_torch(image):
    packages, _ = EXPECTED[image]
    args = _args(_instructions(CONTAINERS / f"{image}.Dockerfile"))
    assert args["BASE"] in BASE_TORCH, f"{image}: add the torch version of {args['BASE']} to BASE_TORCH"
    torch_version = BASE_TORCH[args["BASE"]] or args["TORCH"].removeprefix("torch==")
    for package in sorted(packages):
        assert _admits(package, torch_version), (
            f"{image}: bidir-{package} requires {_torch_requirement(package)}, which does not admit the image's "
            f"torch {torch_version}"
        )


@pytest.mark.parametrize("base", sorted(b for b, v in BASE_TORCH.items() if v))
def test_torch_requirements_admit_other_ngc_releases(base):
    for package in ("core", "train", "export", "serve"):
        assert _admits(package, BASE_TORCH[base]), (package, _torch_requirement(package), BASE_TORCH[base])
