"""The code is layered one way: each module imports only from its own layer or the layers below.

    ipadapter_min.kernels                     attention kernels; nothing else of ours
    ipadapter_min.configs, ip_layers          architecture numbers and layer tables; torchrun processes
      distributed
    ipadapter_min.formats.*                   checkpoint readers and key maps
    ipadapter_min models                      unet, vae, text_encoder, ip_adapter, cfg (batch rows), controlnet, ...
    ipadapter_min.loading                     formats → checked models
    ipadapter_min.pipeline, ip_pipeline       generation, editing; training (recipe, data); CLIP scores
    ipadapter_min.sample, train, evaluate,    command lines (and what they write: PNG metadata, sweeps);
      demo, weights_convert                   the demo world, whose stages run them
    ipadapter_min.benchmarks                  measurements

The graph is read from the source (every ``import``, also inside functions), so a lazy import
cannot hide a cycle.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ipadapter_min", "weights_convert")
LAYERS = [
    {"ipadapter_min.kernels.*"},
    {"ipadapter_min", "ipadapter_min.configs", "ipadapter_min.ip_layers", "ipadapter_min.distributed",
     "ipadapter_min.weight_types", "ipadapter_min.step_ranges"},
    {"ipadapter_min.formats.*"},
    {"ipadapter_min.attention", "ipadapter_min.unet", "ipadapter_min.vae", "ipadapter_min.text_encoder",
     "ipadapter_min.tokenizer", "ipadapter_min.samplers.*", "ipadapter_min.image_encoder",
     "ipadapter_min.image_projection",
     "ipadapter_min.ip_adapter", "ipadapter_min.cfg", "ipadapter_min.controlnet", "ipadapter_min.t2i_adapter",
     "ipadapter_min.image_processing", "ipadapter_min.image_files", "ipadapter_min.negative_noise",
     "ipadapter_min.cpu_convolutions",
     "ipadapter_min.long_prompts"},
    {"ipadapter_min.loading"},
    {"ipadapter_min.pipeline", "ipadapter_min.ip_pipeline", "ipadapter_min.training", "ipadapter_min.training_data",
     "ipadapter_min.training_cache", "ipadapter_min.training_checkpoint", "ipadapter_min.clip_score",
     "ipadapter_min.editing", "ipadapter_min.generation_memory"},
    {"ipadapter_min.sample", "ipadapter_min.image_prompt_args", "ipadapter_min.png_parameters", "ipadapter_min.rerun",
     "ipadapter_min.command_line", "ipadapter_min.sweeps", "ipadapter_min.train", "ipadapter_min.evaluate", "ipadapter_min.demo.*",
     "weights_convert.*"},
    {"ipadapter_min.benchmarks.*"},
]


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, root: Path = ROOT) -> set[str]:
    """Our modules that ``path`` imports (absolute or relative), by full name."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    modules = {module_name(p, root) for pkg in PACKAGES for p in (root / pkg).rglob("*.py")}
    # "from package import name" names a module only when that module exists
    return {m for m in found if m in modules}


def layer_of(module: str) -> int:
    """``pkg.*`` stands for the package and everything in it."""
    for index, layer in enumerate(LAYERS):
        if any(module == p.removesuffix(".*") or (p.endswith(".*") and module.startswith(p[:-1])) for p in layer):
            return index
    raise AssertionError(f"{module} has no layer in tests/test_layers.py: add it")


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    return {module_name(p, root): imports(p, root) for pkg in PACKAGES for p in sorted((root / pkg).rglob("*.py"))}


def upward(root: Path = ROOT) -> list[str]:
    return [f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})"
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
    models = LAYERS[3]
    for module, targets in graph().items():
        if module.startswith("ipadapter_min.formats"):
            assert not targets & models, f"{module} imports {targets & models}"


def test_the_checker_sees_an_upward_import(tmp_path):
    """A format reader that imported a model, relatively or lazily inside a function, is caught."""
    for name, text in {"__init__.py": "", "unet.py": "", "formats/__init__.py": "",
                       "formats/bad.py": "def read():\n    from ..unet import UNet\n"}.items():
        (tmp_path / "ipadapter_min" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "ipadapter_min" / name).write_text(text)
    assert upward(tmp_path) == ["ipadapter_min.formats.bad (layer 2) imports ipadapter_min.unet (layer 3)"]


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
