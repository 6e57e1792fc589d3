"""The layers point one way (docs/architecture.md): core → models and data → explainers →
metrics and attacks → cards → command lines and the explorer. No import cycle, no module
importing one above it (parsed from every module, lazy imports too, and checked by
importing modules alone), and no module outside the registry testing a method's name."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import xai_visualizations as xv

ROOT = Path(__file__).resolve().parents[1]
LAYERS = [
    ("core", {"xai_core", "xai_io", "xai_cache"}),
    ("models and data", {"xai_models", "xai_layers", "cifar10_cnn_model", "architectures",
                         "checkpoints", "cifar10_data", "xai_compression"}),
    ("explainers", {"xai_lrp", "xai_surrogates", "xai_visualizations"}),
    ("metrics and attacks", {"xai_metrics", "xai_attacks", "adversarial"}),
    ("cards", {"xai_cards"}),
    ("command lines and the explorer", {"xai_cli", "train_cifar10", "demo_xai",
                                        "evaluate_xai", "robustness_xai", "compress_xai", "app"}),
]
LAYER = {module: level for level, (_, modules) in enumerate(LAYERS) for module in modules}
REGISTRY = "xai_visualizations"


def test_every_project_module_has_a_layer():
    found = {path.stem for path in ROOT.glob("*.py")}
    assert found == set(LAYER), "a new top-level module needs its place in LAYERS"


def imports(module: str) -> set:
    """The project modules that `module` imports anywhere (lazily inside functions too)."""
    tree = ast.parse((ROOT / f"{module}.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return (names & set(LAYER)) - {module}


def test_imports_point_down_the_layers_and_never_form_a_cycle():
    graph = {module: imports(module) for module in LAYER}
    upward = [(m, other) for m, others in graph.items() for other in others
              if LAYER[other] > LAYER[m]]
    assert not upward, f"modules importing a layer above their own: {upward}"
    state = {}

    def visit(module, path):
        if state.get(module) == "open":
            raise AssertionError(f"import cycle: {' -> '.join(path + [module])}")
        if state.get(module) == "done":
            return
        state[module] = "open"
        for other in sorted(graph[module]):
            visit(other, path + [module])
        state[module] = "done"

    for module in sorted(graph):
        visit(module, [])


def _method_names_compared(tree, names):
    """(line, name) of every comparison (==, !=, in, not in) with a method's name."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        for operand in [node.left, *node.comparators]:
            values = operand.elts if isinstance(operand, (ast.Tuple, ast.List, ast.Set)) \
                else [operand]
            found += [(node.lineno, v.value) for v in values
                      if isinstance(v, ast.Constant) and v.value in names]
    return found


def test_no_module_outside_the_registry_tests_a_method_name():
    names = set(xv.METHODS)
    tested = {module: hits for module in LAYER if module != REGISTRY
              if (hits := _method_names_compared(ast.parse((ROOT / f"{module}.py")
                                                           .read_text()), names))}
    assert not tested, f"method names tested outside {REGISTRY}: {tested}"


def test_the_name_check_finds_what_it_looks_for():
    tree = ast.parse('if method == "lime" or m in ("kernel_shap", "x"): pass')
    assert _method_names_compared(tree, {"lime", "kernel_shap"}) == [
        (1, "lime"), (1, "kernel_shap")]


CLOSURES = """
import importlib, json, sys
ours = set(sys.argv[1].split(","))
found = {}
for module in sorted(ours):
    for name in [n for n in sys.modules if n in ours]:
        del sys.modules[name]  # each module imported alone (JAX and the rest stay loaded)
    importlib.import_module(module)
    found[module] = sorted(set(sys.modules) & ours)
print(json.dumps(found))
"""


@pytest.mark.slow
def test_each_module_imported_alone_pulls_in_only_the_layers_below():
    """Each module imported with none of ours loaded: it imports on its own, and what it
    pulls in is at or below its layer. Training (which needs only PGD) pulls in no
    explainer, and the data loader, in a fresh interpreter, neither a model nor JAX."""
    run = dict(cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    closures = subprocess.Popen([sys.executable, "-c", CLOSURES, ",".join(LAYER)], **run)
    data = subprocess.Popen([sys.executable, "-c", "import json, sys, cifar10_data; "
                             "print(json.dumps(sorted(sys.modules)))"], **run)
    out, err = closures.communicate(timeout=300)
    assert closures.returncode == 0, err
    loaded = json.loads(out.splitlines()[-1])
    for module, found in loaded.items():
        above = {m for m in found if LAYER[m] > LAYER[module]}
        assert not above, f"importing {module} pulled in {above}, above its layer"
    assert loaded["xai_core"] == ["xai_core"]
    assert not set(loaded["train_cifar10"]) & {"xai_visualizations", "xai_metrics",
                                               "adversarial", "xai_lrp", "xai_surrogates"}
    out, err = data.communicate(timeout=300)
    assert data.returncode == 0, err
    assert not set(json.loads(out.splitlines()[-1])) & {"architectures", "checkpoints",
                                                        "xai_models", "jax"}
