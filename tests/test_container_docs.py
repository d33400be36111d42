"""The README's `docker run` keeps what a run writes: the image's output folder and corpus-index cache are mounts.

Output paths come from the shipped config (hydra_config/base.yaml), the image's folders from the Dockerfile.
"""

from __future__ import annotations

import re

from omegaconf import OmegaConf

from tests.launch import REPO


def _documented_docker_run() -> str:
    readme = (REPO / "README.md").read_text()
    command = re.search(r"^docker run .*?(?<!\\)\n", readme, re.M | re.S)
    assert command, "README.md has no docker run command"
    return command.group(0).replace("\\\n", " ")


def test_the_documented_docker_run_mounts_the_output_folder_and_the_index_cache():
    dockerfile = (REPO / "Dockerfile").read_text()
    workdir = re.search(r"^WORKDIR (\S+)", dockerfile, re.M).group(1)
    cache = re.search(r"XDG_CACHE_HOME=(\S+)", dockerfile).group(1)
    mounted = {volume.split(":")[1] for volume in re.findall(r'-v "?([^" ]+)"?', _documented_docker_run())}
    assert {f"{workdir}/outputs", cache} <= mounted


def test_every_path_a_run_writes_by_default_lies_under_outputs():
    base = OmegaConf.to_container(
        OmegaConf.load(REPO / "hydra_config" / "base.yaml")
    )  # interpolations unresolved
    defaults = [base["output_dir"], base["data"]["builtin_dir"], base["hydra"]["sweep"]["dir"]]
    assert all(str(path).startswith("outputs/") for path in defaults), defaults
