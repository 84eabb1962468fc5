"""ipadapter_min installs beside the ecosystem: its only import names are ``ipadapter_min`` and
``weights_convert``, nothing in the repository shadows an installed package, and what is
installed is the tested set of constraints.txt.

Hugging Face's ``kernels`` (which transformers >= 5.25 requires) once met a top-level ``kernels``
of ours: outside the repository theirs won and every command of ours failed; inside, ours won and
``from diffusers import UNet2DConditionModel`` failed.
"""
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

pytestmark = pytest.mark.slow  # wheel builds and every entry point in subprocesses

ROOT = Path(__file__).resolve().parents[1]
IMPORT_NAMES = {"ipadapter_min", "weights_convert"}
DECOYS = ("kernels", "benchmarks")


def entry_points() -> list[str]:
    """Every ``python -m`` module of ours: a package's __main__, or a module that runs as one."""
    found = []
    for package in sorted(IMPORT_NAMES):
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            if path.name == "__main__.py":
                found.append(name.removesuffix(".__main__"))
            elif 'if __name__ == "__main__"' in path.read_text():
                found.append(name)
    return found


def test_the_wheel_holds_two_import_names_and_every_module(tmp_path):
    """The wheel, built from a copy of the tree as pip builds it (build isolation included), has ipadapter_min and
    weights_convert at its top and nothing else, and carries the kernels, the benchmarks and
    the demo's weights inside ipadapter_min."""
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__",
                                                                 ".pytest_cache", ".hypothesis"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
                            "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True)
    assert build.returncode == 0, build.stdout + build.stderr
    [wheel] = (tmp_path / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top == IMPORT_NAMES
    shipped = {name.removesuffix(".py").replace("/", ".") for name in names if name.endswith(".py")}
    ours = {".".join(p.relative_to(ROOT).with_suffix("").parts) for pkg in IMPORT_NAMES for p in (ROOT / pkg).rglob("*.py")}
    assert shipped == ours
    assert any(name.startswith("ipadapter_min/demo/weights/") and name.endswith(".safetensors") for name in names)


def decoyed(tmp_path: Path) -> dict[str, str]:
    """An environment whose PYTHONPATH starts with a ``kernels`` and a ``benchmarks`` that fail
    when imported, as another project's would fail us."""
    decoys = tmp_path / "decoys"
    for name in DECOYS:
        (decoys / name).mkdir(parents=True)
        (decoys / name / "__init__.py").write_text(f"raise ImportError('the decoy {name} was imported')\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(decoys), *filter(None, [os.environ.get("PYTHONPATH")])])}


def test_every_entry_point_answers_help_beside_decoys(tmp_path):
    """From a folder outside the repository, with the decoys first on the path. One process runs
    each module as ``python -m`` would (runpy, as __main__), which saves a torch import a module."""
    modules = entry_points()
    assert {"ipadapter_min.sample", "ipadapter_min.train", "ipadapter_min.evaluate", "ipadapter_min.demo",
            "weights_convert", "ipadapter_min.benchmarks.attention"} <= set(modules)
    code = ("import runpy, sys\n"
            f"for module in {modules!r}:\n"
            "    sys.argv = [module, '--help']\n"
            "    try:\n"
            "        runpy.run_module(module, run_name='__main__', alter_sys=True)\n"
            "    except SystemExit as exit:\n"
            "        print(f'{module} exited {exit.code}', flush=True)\n")
    result = subprocess.run([sys.executable, "-W", "ignore::RuntimeWarning", "-c", code], cwd=tmp_path,
                            env=decoyed(tmp_path), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    exits = [line for line in result.stdout.splitlines() if " exited " in line]
    assert exits == [f"{module} exited 0" for module in modules], result.stdout[-3000:] + result.stderr[-2000:]
    assert result.stdout.count("usage:") == len(modules)


def test_a_demo_generation_runs_beside_decoys(tmp_path):
    """The README's first command, whose fused attention comes from ipadapter_min.kernels."""
    out = tmp_path / "circle.png"
    result = subprocess.run([sys.executable, "-m", "ipadapter_min.sample", "--prompt", "a red circle", "--steps", "4",
                             "--out", str(out)], cwd=tmp_path, env=decoyed(tmp_path), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert out.stat().st_size > 0


def test_diffusers_and_transformers_import_from_the_repository_root():
    """``python -m`` puts the current folder first on the path: from the root, diffusers' UNet
    and transformers' CLIP still find their own dependencies, Hugging Face's kernels among them."""
    code = ("import importlib.util, sys\n"
            "from diffusers import UNet2DConditionModel\n"
            "from transformers import CLIPTextModel, CLIPVisionModelWithProjection\n"
            "spec = importlib.util.find_spec('kernels')\n"
            "print(spec.origin if spec else None)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    origin = result.stdout.strip().splitlines()[-1]
    assert origin == "None" or not Path(origin).resolve().is_relative_to(ROOT), origin


def importable_names(folder: Path) -> set[str]:
    """What ``import NAME`` finds in a folder on the path: a package or a module (a folder without
    __init__.py is a namespace portion, which never wins over an installed package)."""
    return ({p.parent.name for p in folder.glob("*/__init__.py")} |
            {p.stem for p in folder.glob("*.py") if p.stem.isidentifier()})


def test_nothing_in_the_repository_shadows_an_installed_package():
    """The root (first on the path under ``python -m``) and tests/ (which pytest puts on the
    path) hold no import name that an installed distribution other than ours provides."""
    installed = importlib.metadata.packages_distributions()
    for folder in (ROOT, ROOT / "tests"):
        clashes = {name: installed[name] for name in importable_names(folder)
                   if set(installed.get(name, [])) - {"ipadapter_min"}}
        assert not clashes, f"{folder} shadows {clashes}"


def test_the_checks_see_a_shadowing_folder(tmp_path):
    """The shadow check is not vacuous: a top-level kernels package is an import name, and an
    installed distribution provides it."""
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("")
    (tmp_path / "benchmarks").mkdir()  # no __init__.py: a namespace portion
    assert importable_names(tmp_path) == {"kernels"}
    assert "kernels" in importlib.metadata.packages_distributions(), "Hugging Face's kernels is not installed"


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned(file: str) -> dict[str, str]:
    """name → version, from a constraints file's ``name==version`` lines."""
    lines = (ROOT / file).read_text().splitlines()
    return {normalized(name): version.strip() for name, version in
            (line.split("==") for line in lines if line.strip() and not line.startswith("#"))}


def requirements() -> list[Requirement]:
    """setup.py's requirements, the [test] extra's included, as the installed metadata has them."""
    found = [Requirement(text) for text in importlib.metadata.requires("ipadapter_min")]
    return [r for r in found if r.marker is None or r.marker.evaluate({"extra": "test"})]


def test_installed_versions_are_one_tested_set():
    """Every distribution here is in constraints.txt at its version (or, for the oldest-versions
    run, in constraints-oldest.txt), with nothing more or less: the suite runs on a set the
    README installs."""
    installed = {normalized(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}
    del installed["ipadapter-min"], installed["pip"]
    differences = {}
    for file in ("constraints.txt", "constraints-oldest.txt"):
        constraints = pinned(file)
        differences[file] = {name: (installed.get(name), constraints.get(name))
                             for name in set(installed) | set(constraints) if installed.get(name) != constraints.get(name)}
    assert not all(differences.values()), f"(installed, pinned) where they differ: {differences['constraints.txt']}"


def test_the_ranges_run_from_the_oldest_tested_set_to_the_newest():
    """Each floor in setup.py is the version constraints-oldest.txt installs, and constraints.txt's
    version is in range: a floor never claims a release the suite did not run with."""
    oldest, newest = pinned("constraints-oldest.txt"), pinned("constraints.txt")
    for requirement in requirements():
        name = normalized(requirement.name)
        assert newest[name] in requirement.specifier and oldest[name] in requirement.specifier, requirement
        floors = [s.version for s in requirement.specifier if s.operator == ">="]
        if name != "triton":  # torch pins its own triton
            assert floors == [oldest[name]], f"{requirement}: the oldest tested is {oldest[name]}"
