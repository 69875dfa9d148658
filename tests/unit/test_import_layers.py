"""Import layers of prefvec_ds: every import points down, no package circle, deepspeed boxed in.

The imports of every module are read from its source (an AST walk, so function-local imports
count too: they run later, but they are still a dependency). A module may import its own layer
and those below, never one above. The order is the one in the package docstring
(prefvec_ds/__init__.py), bottom to top:

    prefvec_ds, atomic   PrefvecError and atomic file writes: they import nothing of ours
    ckpt                 checkpoint arithmetic: torch-free, runs without a config (`prefvec vector`)
    config               YAML -> dataclasses; validates names (config.choices), never imports code
    data                 sources -> PreferencePairs, tokenization (reads config sections)
    models               model construction: tiny Llama, HF folders, GGUF, preference models
    distributed          the only home of deepspeed and torch.distributed
    train                sft, ref_logps, dpo, rm, and entry.py (the rank process `prefvec train`
                         starts: it sits at the package root only so that launchers can say
                         `-m prefvec_ds.entry`, and it imports train and below)
    eval                 scorers, sweep, report, diagnostics (reads trained folders)
    mora                 data synthesis: generates with eval, scores with eval's scorers
    pipeline             the stage DAG and its local / SLURM executors, over all of the above
    cli                  `prefvec ...`: the argument parser of every command
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import prefvec_ds

pytestmark = pytest.mark.unit

PACKAGE_DIR = Path(prefvec_ds.__file__).parent

#: Bottom to top; each entry is one layer of units (a subpackage or a top-level module).
LAYERS = (("prefvec_ds", "atomic"), ("ckpt",), ("config",), ("data",), ("models",),
          ("distributed",), ("train", "entry"), ("eval",), ("mora",), ("pipeline",), ("cli",))

#: Units that are one package for the circle check: entry.py is the rank-side half of
#: `prefvec train` (train/commands.py runs it in-process under `--launcher none`).
SAME_PACKAGE = {"entry": "train"}

#: The only units that may import deepspeed or torch.distributed.
DISTRIBUTED_UNITS = {"distributed"}

LAYER_OF = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}


def module_files() -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the package."""
    out = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = module_files()


def unit_of(module: str) -> str:
    """prefvec_ds.eval.sweep -> eval; prefvec_ds.entry -> entry; prefvec_ds -> prefvec_ds."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _resolve_from(module: str, path: Path, node: ast.ImportFrom) -> list[str]:
    """Targets of `from X import a, b`: X.a when that is a module (or X is not ours), else X."""
    base = node.module or ""
    if node.level:  # relative: from the module's package, one level up per extra dot
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        package = package[: len(package) - node.level + 1]
        base = ".".join(package + ([node.module] if node.module else []))
    if base != "prefvec_ds" and not base.startswith("prefvec_ds."):
        return [f"{base}.{a.name}" for a in node.names]  # `from torch import distributed`
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]


def imports_of(module: str) -> list[tuple[str, int]]:
    """(imported name, line) of every import statement anywhere in the module's source."""
    path = MODULES[module]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            found += [(t, node.lineno) for t in _resolve_from(module, path, node)]
    return found


def internal_edges() -> dict[tuple[str, str], int]:
    """(importer, imported module of prefvec_ds) -> first line, across the whole package."""
    edges: dict[tuple[str, str], int] = {}
    for module in MODULES:
        for target, line in imports_of(module):
            if target == "prefvec_ds" or target.startswith("prefvec_ds."):
                while target not in MODULES:  # `import prefvec_ds.x.Name`: its module
                    target = target.rsplit(".", 1)[0]
                edges.setdefault((module, target), line)
    return edges


EDGES = internal_edges()


def where(edge: tuple[str, str]) -> str:
    importer, target = edge
    path = MODULES[importer].relative_to(PACKAGE_DIR.parent)
    return (f"{path}:{EDGES[edge]}: {importer} ({unit_of(importer)}) imports {target} "
            f"({unit_of(target)})")


def upward_edges() -> list[tuple[str, str]]:
    return [(a, b) for a, b in EDGES if LAYER_OF[unit_of(b)] > LAYER_OF[unit_of(a)]]


def test_every_unit_has_a_layer():
    units = {unit_of(m) for m in MODULES}
    assert not units - set(LAYER_OF), (
        f"place the new package(s) {sorted(units - set(LAYER_OF))} in LAYERS (here and in "
        "the prefvec_ds docstring)")


def test_package_docstring_states_the_order():
    """The docstring of prefvec_ds says the same order as LAYERS."""
    stated = " < ".join("/".join(layer) for layer in LAYERS)
    assert stated in " ".join(prefvec_ds.__doc__.split()), (
        f"prefvec_ds/__init__.py should state the layer order {stated!r}")


def test_no_upward_import():
    found = set(upward_edges())
    unexpected = sorted(found)
    order = " < ".join("/".join(layer) for layer in LAYERS)
    assert not unexpected, (f"imports that point up the layers ({order}):\n"
                            + "\n".join(where(e) for e in unexpected))


def package_circles(edges) -> list[list[str]]:
    """Strongly connected groups of more than one package (Tarjan's algorithm)."""
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        ua, ub = (SAME_PACKAGE.get(u, u) for u in (unit_of(a), unit_of(b)))
        graph.setdefault(ua, set())
        graph.setdefault(ub, set())
        if ua != ub:
            graph[ua].add(ub)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while not group or group[-1] != node:
                group.append(stack.pop())
            if len(group) > 1:
                circles.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return circles


def circle_path(edges, group: list[str]) -> list[tuple[str, str]]:
    """One module edge per step of a shortest package circle through group[0]."""
    step = {}
    for a, b in edges:
        ua, ub = (SAME_PACKAGE.get(u, u) for u in (unit_of(a), unit_of(b)))
        if ua != ub and {ua, ub} <= set(group):
            step.setdefault((ua, ub), (a, b))
    paths = {group[0]: []}
    frontier = [group[0]]
    while frontier:
        nxt = []
        for node in frontier:
            for (ua, ub), edge in sorted(step.items()):
                if ua == node and ub == group[0]:
                    return paths[node] + [edge]
                if ua == node and ub not in paths:
                    paths[ub] = paths[node] + [edge]
                    nxt.append(ub)
        frontier = nxt
    return []


def test_no_circle_between_packages():
    edges = EDGES
    circles = package_circles(edges)
    details = [f"among {', '.join(group)}, e.g.:\n  "
               + "\n  ".join(where(e) for e in circle_path(edges, group)) for group in circles]
    assert not circles, "import circles between packages:\n" + "\n".join(details)


def test_circle_finder_finds_a_circle():
    """The check above can fail: a made-up data -> mora -> data pair of edges is a circle."""
    made_up = [("prefvec_ds.data.sources", "prefvec_ds.mora.gather"),
               ("prefvec_ds.mora.gather", "prefvec_ds.data.pairs"),
               ("prefvec_ds.cli", "prefvec_ds.data.pairs")]
    assert package_circles(made_up) == [["data", "mora"]]


def test_deepspeed_and_torch_distributed_only_in_distributed():
    found = []
    for module, path in MODULES.items():
        if unit_of(module) in DISTRIBUTED_UNITS:
            continue
        for name, line in imports_of(module):
            if name.split(".")[0] == "deepspeed" or name.startswith("torch.distributed"):
                found.append(f"{path.relative_to(PACKAGE_DIR.parent)}:{line}: imports {name}")
    assert not found, "deepspeed / torch.distributed outside prefvec_ds/distributed:\n" + \
        "\n".join(found)


def test_library_code_calls_functions_not_our_command_lines():
    """Inside a process, stages call typed functions (compute_vector, merge_vectors, run_rank):
    nothing but the `prefvec` command itself imports prefvec_ds.cli, and nothing imports the
    argv front doors (`main`) of entry.py or of the stage job."""
    front_doors = {"prefvec_ds.cli", "prefvec_ds.entry.main", "prefvec_ds.pipeline.job.main"}
    offenders = []
    for name, path in module_files().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                targets = {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                targets = {a.name for a in node.names}
            else:
                continue
            if targets & front_doors and name != "prefvec_ds.cli":
                offenders.append(f"{path.relative_to(PACKAGE_DIR.parent)}:{node.lineno}")
    assert not offenders, "argv front doors called from library code:\n" + "\n".join(offenders)
