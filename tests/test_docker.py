"""The container cannot be built here (no engine): check what it runs is what CI runs."""

import re

from tests.conftest import REPO

DOCKERFILE = (REPO / "docker" / "Dockerfile").read_text()


def test_base_image_is_pinned_by_tag_and_matches_the_torch_pin():
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", DOCKERFILE, re.M).group(1)
    name, _, tag = base.partition(":")
    assert name == "pytorch/pytorch" and tag and tag != "latest"
    pinned = re.search(r"^torch==([\d.]+)$", (REPO / "scripts" / "constraints.txt").read_text(), re.M).group(
        1
    )
    assert tag.startswith(f"{pinned}-cuda"), (tag, pinned)
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", DOCKERFILE, re.M)


def test_it_installs_with_the_readme_command_and_copies_what_that_needs():
    assert "RUN PYTHON=python bash scripts/install.sh" in DOCKERFILE
    assert "bash scripts/install.sh" in (REPO / "README.md").read_text()
    assert "bash scripts/install.sh" in (REPO / ".ci" / "run").read_text()
    copied = set(re.findall(r"^COPY (.+) \S+$", DOCKERFILE, re.M))
    sources = {part for line in copied for part in line.split()}
    for needed in ("setup.py", "README.md", "ffn_dist", "launchers", "configs", "scripts"):
        assert needed in sources and (REPO / needed).exists(), needed
    assert re.search(r'^ENTRYPOINT \["ffn"\]$', DOCKERFILE, re.M)
