"""How imagetool is installed and started: a built wheel carries everything `imagetool build`
needs (the diskimage-builder elements, not only the Python), and `python -m imagetool` is the
same command line as `imagetool`, every command of it.

The wheel is built with this venv's setuptools (--no-build-isolation) and installed into a fresh
venv that borrows this venv's dependencies, so nothing comes from the network.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import sysconfig
from pathlib import Path

import click
import pytest

from imagetool.build import PROJECT_ELEMENTS
from imagetool.cli import main

REPO = Path(__file__).resolve().parent.parent
# What a wheel is built from.
SOURCES = ["pyproject.toml", "README.md", "LICENSE", "imagetool", "rollout", "elements"]


def clean_env() -> dict[str, str]:
    """Without PYTHONPATH (it points at the checkout) or IMAGETOOL_ELEMENTS: what runs must be
    the installed package, finding its own elements."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "IMAGETOOL_ELEMENTS")}


def tree(root: Path) -> dict[str, bool]:
    """Every file under root, relative, and whether it is executable (diskimage-builder runs
    only the executable scripts of an element's phase directories)."""
    return {
        str(p.relative_to(root)): bool(p.stat().st_mode & stat.S_IXUSR)
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding imagetool from a wheel built from this checkout; its python."""
    tmp = tmp_path_factory.mktemp("wheel")
    source, dist, venv = tmp / "source", tmp / "dist", tmp / "venv"
    # A copy of what the build reads: setuptools builds in the source tree, and a build/ left in
    # the checkout by an earlier build would hand its files to this one.
    source.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "--no-index", "-w", str(dist), str(source)], check=True, cwd=tmp, env=clean_env())
    [wheel] = dist.glob("imagetool-*.whl")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin/python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    "--no-index", str(wheel)], check=True, cwd=tmp, env=clean_env())
    # The dependencies: this venv's site-packages, after the new venv's own. A path line in a .pth
    # file is only a path; the editable install's finder in there is not loaded.
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             check=True, capture_output=True, text=True).stdout.strip()
    (Path(purelib) / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return python


def run_in(python: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    # cwd outside the checkout: `python -m` puts the working directory first on sys.path.
    return subprocess.run([str(python), *argv], capture_output=True, text=True, check=False,
                          cwd=python.parent, env=clean_env())


def test_installed_wheel_finds_every_element(installed: Path) -> None:
    r = run_in(installed, "-c", """if True:
        import json, imagetool
        from imagetool.build import elements_dir
        print(json.dumps({"package": imagetool.__file__, "elements": str(elements_dir())}))""")
    assert r.returncode == 0, r.stderr
    found = json.loads(r.stdout)
    package = Path(found["package"]).parent
    assert package.is_relative_to(installed.parent.parent), f"imported from {package}, not the venv"
    assert Path(found["elements"]) == package / "elements"
    assert tree(package / "elements") == tree(REPO / "elements")
    assert all((package / "elements" / e).is_dir() for e in PROJECT_ELEMENTS)
    assert (package / "py.typed").is_file()


def test_installed_wheel_has_every_module(installed: Path) -> None:
    """pyproject.toml lists the packages: a new one left out of the list fails here."""
    r = run_in(installed, "-c", "import imagetool, pathlib; print(pathlib.Path(imagetool.__file__).parent.parent)")
    assert r.returncode == 0, r.stderr
    site = Path(r.stdout.strip())
    for top in ("imagetool", "rollout"):
        modules = {str(p.relative_to(REPO)) for p in (REPO / top).rglob("*.py")}
        missing = {m for m in modules if not (site / m).is_file()}
        assert not missing, f"not in the wheel (pyproject.toml [tool.setuptools] packages): {sorted(missing)}"


def test_installed_wheel_metadata(installed: Path) -> None:
    r = run_in(installed, "-c", "from importlib import metadata; m = metadata.metadata('imagetool');"
               "print(m['License-Expression'], m['License-File'])")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["Apache-2.0", "LICENSE"]


@pytest.mark.parametrize("argv", [["imagetool", "--help"], ["-m", "imagetool", "--help"], ["imagetool", "--version"]])
def test_installed_wheel_runs(installed: Path, argv: list[str]) -> None:
    if argv[0] == "imagetool":
        r = subprocess.run([str(installed.parent / "imagetool"), *argv[1:]], capture_output=True, text=True,
                           check=False, cwd=installed.parent, env=clean_env())
    else:
        r = run_in(installed, *argv)
    assert r.returncode == 0, r.stderr
    assert ("0.1.0" if "--version" in argv else "Commands:") in r.stdout


def command_paths(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command of the tree, groups included, as the words that name it."""
    paths = []
    for name, command in sorted(group.commands.items()):
        paths.append((*prefix, name))
        if isinstance(command, click.Group):
            paths += command_paths(command, (*prefix, name))
    return paths


COMMANDS = command_paths(main)


def test_command_tree_is_whole() -> None:
    """The walk below sees the groups' commands, not only the top floor."""
    assert {("build",), ("keygen",), ("lab",), ("lab", "up"), ("rollout",)} <= set(COMMANDS)


@pytest.mark.parametrize("words", COMMANDS, ids=" ".join)
def test_python_m_imagetool_runs_every_command(words: tuple[str, ...]) -> None:
    r = subprocess.run([sys.executable, "-m", "imagetool", *words, "--help"], capture_output=True, text=True,
                       check=False, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"Usage: python -m imagetool {' '.join(words)} "), r.stdout


def test_python_m_imagetool_runs_commands_not_only_their_help(tmp_path: Path) -> None:
    """keygen does its work, and a lab command's error is the CLI's message and exit code."""
    def run(*words: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "imagetool", *words], capture_output=True, text=True,
                              check=False, cwd=REPO)

    r = run("keygen", "--private", str(tmp_path / "k.pem"), "--public", str(tmp_path / "k.pub"))
    assert r.returncode == 0, r.stderr
    assert "PRIVATE KEY" in (tmp_path / "k.pem").read_text() and "PUBLIC KEY" in (tmp_path / "k.pub").read_text()
    r = run("lab", "status", "--lab", "nolab", "--lab-dir", str(tmp_path / "labs"))
    assert r.returncode == 2 and "error: no lab named 'nolab'" in r.stderr, (r.returncode, r.stderr)
