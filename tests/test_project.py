"""Project metadata the registry and CI rely on."""

from __future__ import annotations

import re

import tomllib

from comfyui_dp_adapt.tests.support.pack import PACK_ROOT


def _readme_test_command() -> str:
    readme = (PACK_ROOT / "README.md").read_text()
    section = readme.split("## Tests", 1)[1]
    return re.search(r"```bash\n(.+?)\n```", section, re.S).group(1).strip()


def test_ci_runs_the_test_command_written_in_the_readme():
    command = _readme_test_command()
    lines = [line.strip() for line in (PACK_ROOT / ".ci" / "run").read_text().splitlines()]
    assert command in lines


def test_pyproject_has_the_registry_metadata():
    data = tomllib.loads((PACK_ROOT / "pyproject.toml").read_text())
    project = data["project"]
    assert project["name"] == "comfyui-dp-adapt"
    assert project["license"] == {"file": "LICENSE"}
    licence = (PACK_ROOT / "LICENSE").read_text()
    assert "GNU GENERAL PUBLIC LICENSE" in licence and "Version 3" in licence
    assert project["version"] and project["description"] and project["dependencies"]
    assert "Repository" in project["urls"]
    comfy = data["tool"]["comfy"]
    assert {"PublisherId", "DisplayName", "Icon", "requires-comfyui"} <= set(comfy)
    icon = comfy["Icon"].rsplit("/main/", 1)[-1]
    assert comfy["Icon"].startswith("https://") and (PACK_ROOT / icon).is_file()
    assert "Operating System :: OS Independent" in project["classifiers"]
    requirements = (PACK_ROOT / "requirements.txt").read_text()
    for dependency in project["dependencies"]:
        assert dependency in requirements, f"{dependency} missing from requirements.txt"
