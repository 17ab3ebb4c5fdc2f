"""Packaging: the pins agree, and an installed copy (not the checkout) runs with its base registry."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)$")


def _pins(lines: list[str]) -> set[tuple[str, str]]:
    pins = set()
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = PIN.match(line)
        assert match, f"not an exact pin: {line!r}"
        pins.add((match.group(1).lower().replace("_", "-"), match.group(2)))
    return pins


def test_env_yaml_pins_the_same_packages_as_requirements_txt():
    requirements = _pins((REPO / "requirements.txt").read_text().splitlines())
    env = yaml.safe_load((REPO / "env.yaml").read_text())
    pip_lists = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip_lists) == 1
    assert _pins(pip_lists[0]) == requirements
    assert ("torch", "2.13.0") in requirements


def test_the_base_registry_ships_inside_the_package():
    from ivlib.config import BASE_CONFIG

    assert BASE_CONFIG == REPO / "ivlib" / "base.yaml" and BASE_CONFIG.is_file()
    assert not (REPO / "config" / "base.yaml").exists()


def _copy_project(dest: Path) -> Path:
    """The files a build reads, so building never writes build/ or *.egg-info into the checkout."""
    src = dest / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "ivlib", src / "ivlib", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return src


def test_an_installed_copy_runs_from_elsewhere_and_finds_its_base_registry(tmp_path):
    src = _copy_project(tmp_path)
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(site)]
        + ["--no-index", "--no-cache-dir", str(src)],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (site / "ivlib" / "base.yaml").is_file()
    script = site / "bin" / "ivlib"
    assert script.is_file()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = str(site)  # the install only: the checkout is not on the path from here

    where = subprocess.run(
        [sys.executable, "-c", "import ivlib; print(ivlib.__file__, ivlib.__version__)"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert where.returncode == 0, where.stderr
    file, version = where.stdout.split()
    assert Path(file).resolve().is_relative_to(site.resolve())
    import ivlib

    assert version == ivlib.__version__

    helped = subprocess.run(
        [str(script), "--help"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120
    )
    assert helped.returncode == 0, helped.stderr
    assert "usage:" in helped.stdout and "--model" in helped.stdout

    refused = subprocess.run(
        [str(script), "-m", "no-such-model", "-t", "x"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 2, refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1, refused.stderr
    assert "unknown model 'no-such-model'" in lines[0]
    assert "gpt-j-6b" in lines[0] and "smollm2-135m" in lines[0]  # names from the installed base.yaml
