"""torchgc's import graph follows its layers (README, "Layout"): a module imports only modules of
its own layer or of layers below it, and config imports nothing of torchgc. Read from the source
with ast, so imports inside functions count too."""

import ast
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "torchgc"

# Bottom to top, as in the README. A name ending in ".*" covers a package's modules.
LAYERS = [
    ("op bindings", ["torchgc._library", "torchgc.ops"]),
    ("options", ["torchgc.config"]),
    ("counters", ["torchgc.counters"]),
    ("measuring", ["torchgc.measuring"]),
    ("strategies", ["torchgc.offload", "torchgc.selective", "torchgc.selective_cache", "torchgc.routing", "torchgc.layer_calls", "torchgc.modes", "torchgc.compiled",
                    "torchgc.strategies"]),
    ("planner", ["torchgc.layer_cost", "torchgc.planner"]),
    ("norms", ["torchgc.norm_modules", "torchgc.fp32_logits", "torchgc.norm"]),
    ("integrations", ["torchgc.integrations", "torchgc.integrations.*"]),
    ("patching", ["torchgc.patching"]),
    ("front door", ["torchgc", "torchgc.__main__", "torchgc.cli", "torchgc.bench", "torchgc.bench.*", "torchgc._startup.sitecustomize"]),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


def layer_of(module: str) -> int:
    for index, (_, patterns) in enumerate(LAYERS):
        for pattern in patterns:
            if module == pattern or (pattern.endswith(".*") and module.startswith(pattern[:-1])):
                return index
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS here and to the README's Layout")


def torchgc_imports(module: str) -> set:
    """The torchgc modules that `module` imports; `from torchgc import ops` imports torchgc.ops."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in MODULES else node.module)
    return {name for name in found if name == "torchgc" or name.startswith("torchgc.")}


def test_the_import_reader_sees_known_edges():
    # Guards the test below against a reader that finds nothing, which would pass trivially.
    assert "torchgc.offload" in torchgc_imports("torchgc.strategies")
    assert {"torchgc.config", "torchgc.integrations.transformers"} <= torchgc_imports("torchgc.patching")
    assert "torchgc.norm" in torchgc_imports("torchgc.integrations.transformers")  # imported inside a function


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_import_reaches_a_higher_layer(module):
    own = layer_of(module)
    upward = sorted(f"{name} ({LAYERS[layer_of(name)][0]})" for name in torchgc_imports(module) if layer_of(name) > own)
    assert not upward, f"{module} ({LAYERS[own][0]}) imports from higher layers: {', '.join(upward)}"


def test_config_is_a_leaf():
    assert torchgc_imports("torchgc.config") == set()
