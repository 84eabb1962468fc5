"""The code is layered one way: each module imports only from its own layer or the layers below,
and each layer is a folder (the README's Layout table lists them, in this order, from the bottom):

    kernels       attention kernels; nothing else of ours
    samplers      noise schedule, samplers, the guidance batch rows, step ranges
    models        configs, tokenizer, text encoder, UNet, VAE, image encoder, ControlNet, T2I-Adapter
    ip_adapter    the paper's adapter (projection, K/V pairs, decoupled attention hook, λ) and its extras
    formats       checkpoint readers and key maps: configs and layer tables, never model classes
    loading       formats → checked models
    pipelines     prompt, reference images, init image, mask, controls → images
    training      the recipe, its data, cache, checkpoints, processes; CLIP scores
    cli           the command lines' parts (and weights_convert); demo/__init__ names the shipped weights
    demo          the demo world, whose stages run the command lines
    ipadapter_min the public API (lazy) and the thin ``python -m`` entry modules
    benchmarks    measurements

The graph is read from the source (every ``import``, also inside functions), so a lazy import
cannot hide a cycle.
"""
import ast
import functools
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ipadapter_min", "weights_convert")
# (name, module patterns); ``pkg.*`` is the package and everything in it; the first match wins
LAYERS = [
    ("kernels", {"ipadapter_min.kernels.*"}),
    ("samplers", {"ipadapter_min.samplers.*"}),
    ("models", {"ipadapter_min.models.*"}),
    ("ip_adapter", {"ipadapter_min.ip_adapter.*"}),
    ("formats", {"ipadapter_min.formats.*"}),
    ("loading", {"ipadapter_min.loading.*"}),
    ("pipelines", {"ipadapter_min.pipelines.*"}),
    ("training", {"ipadapter_min.training.*"}),
    ("cli", {"ipadapter_min.cli.*", "weights_convert.*", "ipadapter_min.demo"}),
    ("demo", {"ipadapter_min.demo.*"}),
    ("ipadapter_min", {"ipadapter_min", "ipadapter_min.sample", "ipadapter_min.train", "ipadapter_min.evaluate"}),
    ("benchmarks", {"ipadapter_min.benchmarks.*"}),
]


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, root: Path = ROOT) -> set[str]:
    """Our modules that ``path`` imports (absolute or relative), by full name."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    modules = {module_name(p, root) for pkg in PACKAGES for p in (root / pkg).rglob("*.py")}
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_LAZY" for t in node.targets):
            # a table of lazily imported names (the package's public API): each module it names
            found.update(".".join(package.split(".")[: len(package.split(".")) - (len(m) - len(m.lstrip("."))) + 1]
                                  + [m.lstrip(".")]) for m in ast.literal_eval(node.value).values())
    return {m for m in found if m in modules}


def layer_of(module: str) -> int:
    """``pkg.*`` stands for the package and everything in it."""
    for index, (_, layer) in enumerate(LAYERS):
        if any(module == p.removesuffix(".*") or (p.endswith(".*") and module.startswith(p[:-1])) for p in layer):
            return index
    raise AssertionError(f"{module} has no layer in tests/test_layers.py: add it")


@functools.cache
def graph(root: Path = ROOT) -> dict[str, set[str]]:
    return {module_name(p, root): imports(p, root) for pkg in PACKAGES for p in sorted((root / pkg).rglob("*.py"))}


def upward(root: Path = ROOT) -> list[str]:
    return [f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
            for module, targets in graph(root).items() for target in sorted(targets)
            if layer_of(target) > layer_of(module)]


def test_every_import_points_down_or_sideways():
    wrong = upward()
    assert not wrong, "\n".join(wrong)


def test_packages_do_not_import_each_other_back():
    package_graph = {}
    for module, targets in graph().items():
        package_graph.setdefault(module.split(".")[0], set()).update(t.split(".")[0] for t in targets)
    cycles = [(a, b) for a, targets in package_graph.items() for b in targets
              if a != b and a in package_graph.get(b, set())]
    assert not cycles, cycles
    kernels = {t for m, targets in graph().items() if m.startswith("ipadapter_min.kernels") for t in targets}
    assert all(t.startswith("ipadapter_min.kernels") for t in kernels), kernels


def test_formats_know_no_model_classes():
    """Readers may take the architecture's numbers (configs, the cross-attention layer table), never a model."""
    allowed = {"ipadapter_min.models.configs", "ipadapter_min.ip_adapter.layers"}
    for module, targets in graph().items():
        if module.startswith("ipadapter_min.formats"):
            outside = {t for t in targets if not t.startswith("ipadapter_min.formats")}
            assert outside <= allowed, f"{module} imports {outside - allowed}"


def test_the_checker_sees_an_upward_import(tmp_path):
    """A model that imported a pipeline, relatively and lazily inside a function, is caught."""
    for name, text in {"__init__.py": "", "models/__init__.py": "", "pipelines/__init__.py": "",
                       "pipelines/text_to_image.py": "",
                       "models/bad.py": "def run():\n    from ..pipelines import text_to_image\n"}.items():
        (tmp_path / "ipadapter_min" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "ipadapter_min" / name).write_text(text)
    assert upward(tmp_path) == ["ipadapter_min.models.bad (models) imports ipadapter_min.pipelines.text_to_image "
                                "(pipelines)"]


FOLDERS = [name for name, _ in LAYERS if name != "ipadapter_min"]


def imported_layers(folder: str) -> set[str]:
    """The other layers that the modules of ``ipadapter_min/<folder>/`` import."""
    return {LAYERS[layer_of(t)][0] for m, targets in graph().items()
            if m == f"ipadapter_min.{folder}" or m.startswith(f"ipadapter_min.{folder}.") for t in targets} - {folder}


def test_each_layer_folder_says_what_it_imports():
    """Each folder's docstring ends by naming the layers it imports from, and they are the ones it does."""
    wrong = []
    for folder in FOLDERS:
        doc = ast.get_docstring(ast.parse((ROOT / "ipadapter_min" / folder / "__init__.py").read_text())) or ""
        said = re.search(r"It imports (?:from: ([\w, ]+)|(nothing else of ours))\.\s*$", doc)
        named = set() if said is None or said.group(2) else set(said.group(1).replace(" and ", ", ").split(", "))
        if said is None or named != imported_layers(folder):
            wrong.append(f"ipadapter_min/{folder}/__init__.py: says {sorted(named) if said else 'nothing'}, "
                         f"imports from {sorted(imported_layers(folder))}")
    assert not wrong, "\n".join(wrong)


def layout_table() -> list[tuple[str, list[str]]]:
    """The README's Layout table: (layer, the paths in its second column) per row."""
    text = (ROOT / "README.md").read_text().split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in text.splitlines() if line.startswith("| ")][1:]
    return [(row.split("|")[1].strip(), re.findall(r"`([^`]+)`", row.split("|")[2])) for row in rows]


def test_the_readme_layout_table_is_the_tree():
    """Its rows are the layers, bottom up; every path it names exists, and every module of ours lies
    under a path of its own layer's row."""
    table = layout_table()
    assert [layer for layer, _ in table] == [name for name, _ in LAYERS]
    paths = dict(table)
    missing = [p for ps in paths.values() for p in ps if not (ROOT / p).exists()]
    assert not missing, missing
    unlisted = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            if not any(relative == p or relative.startswith(p) and p.endswith("/")
                       for p in paths[LAYERS[layer_of(module_name(path))][0]]):
                unlisted.append(relative)
    assert not unlisted, f"in no row of their layer in the README's Layout table: {unlisted}"


ORACLES = {"diffusers", "transformers", "accelerate", "peft"}


def oracle_imports(path: Path) -> list[tuple[int, bool]]:
    """(line, at module level) of each import of a test-only oracle in ``path``."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
        if any(name.split(".")[0] in ORACLES for name in names):
            found.append((node.lineno, id(node) in top))
    return found


def test_only_the_benchmarks_import_the_oracles_and_only_when_comparing():
    """diffusers and its kin are the [test] extra, not requirements: the runtime never imports
    them (tests/test_sd15_loading.py checks the running process). ipadapter_min.benchmarks
    compares against them, so it may import them, inside the functions that compare."""
    wrong = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = module_name(path)
            for line, top_level in oracle_imports(path):
                if not name.startswith("ipadapter_min.benchmarks") or top_level:
                    wrong.append(f"{path.relative_to(ROOT)}:{line}")
    assert not wrong, wrong


@pytest.mark.slow  # commands in subprocesses
def test_the_public_api_is_the_top_level_and_lazy():
    """``import ipadapter_min`` imports no torch; each public name resolves to its defining module's
    object; an unknown name is an AttributeError, as for any module."""
    code = ("import sys, ipadapter_min\n"
            "assert 'torch' not in sys.modules, 'import ipadapter_min imported torch'\n"
            "for name in ipadapter_min.__all__:\n"
            "    value = getattr(ipadapter_min, name)\n"
            "    assert value.__name__ == name and value.__module__.startswith('ipadapter_min.'), name\n"
            "assert hasattr(ipadapter_min, 'StableDiffusion') and not hasattr(ipadapter_min, 'nothing')\n"
            "from ipadapter_min import IPAdapterPipeline, StableDiffusion, load_sd15\n"
            "from ipadapter_min.pipelines.text_to_image import StableDiffusion as defined\n"
            "assert StableDiffusion is defined\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
