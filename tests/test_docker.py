"""The Docker image installs knlight the same way as the README's set-up script."""

from __future__ import annotations

import re

from conftest import REPO


def test_dockerfile_installs_the_same_extras_as_scripts_setup() -> None:
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    quickstart = (REPO / "scripts" / "quickstart").read_text()
    setup = (REPO / "scripts" / "setup").read_text()
    extras = re.search(r"EXTRAS=(\S+)", quickstart)
    assert extras is not None
    assert f'pip install --no-cache-dir -e ".[{extras.group(1)}]"' in dockerfile
    assert 'pip install -q --disable-pip-version-check -e ".[${EXTRAS:-}]"' in setup
    # The base image's torch must satisfy the project's torch requirement.
    torch_in_image = re.search(r"pytorch/pytorch:(\d+)\.(\d+)", dockerfile)
    required = re.search(r'"torch>=(\d+)\.(\d+)"', (REPO / "pyproject.toml").read_text())
    assert torch_in_image and required
    assert tuple(map(int, torch_in_image.groups())) >= tuple(map(int, required.groups()))
    for config in re.findall(r"configs/\S+\.yaml", dockerfile):
        assert (REPO / config).exists(), config
