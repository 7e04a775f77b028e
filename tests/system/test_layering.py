"""system/'s subpackages import each other in one direction only: no import cycle between them, and
every import (module level or inside a function) points down `LAYERS`. Parsed with `ast`, so a
lazy import inside a function counts as much as one at the top of a file."""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SYSTEM = ROOT / "system"

# The intended order, lowest first: a unit may import only units before it (and itself).
#   config       typed config schemas: a leaf (tests/system/config/test_layers.py: nothing else, no torch)
#   train_utils  seeding, image grids: plain helpers
#   data         storage, shard formats, readers
#   models       nn.Modules, export I/O + the Tokenizer / Generator protocols (models/artifacts.py),
#                tokenizer adapters beside their models and the tokenizer kinds (models/tokenizers.py)
#   encode       shard sets encoded with a frozen model (pre-tokenization, latent cache)
#   losses       reconstruction, perceptual, GAN, alignment losses
#   sampling     AR / masked sampling, the generator adapter and the generator kinds (sampling/generators.py)
#   eval         metrics, sampling parts, the evaluation suite
#   methods      the training methods (one contract) and their registry
LAYERS = ("config", "train_utils", "data", "models", "encode", "losses", "sampling", "eval", "methods", "plan", "pipelines")

Edges = dict[tuple[str, str], list[str]]  # (importer unit, imported unit) -> ["file:line module", ...]


def unit_of(path: Path, system: Path = SYSTEM) -> str:
    """The top-level unit under system/ of a file: its subpackage, or its module name."""
    return path.relative_to(system).parts[0].removesuffix(".py")


def imported_modules(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, absolute dotted name) of every import in `path`, at any depth (functions, classes,
    `if TYPE_CHECKING:`); `from system import x` gives "system.x", relative imports are resolved."""
    package = list(path.relative_to(root).with_suffix("").parts)[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[: len(package) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base == "system":
                out += [(node.lineno, f"system.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, base))
    return out


def import_edges(system: Path = SYSTEM) -> Edges:
    """Imports from one unit under `system` (the system/ folder) into another."""
    edges: Edges = defaultdict(list)
    for f in sorted(system.rglob("*.py")):
        src = unit_of(f, system)
        if src == "__init__":
            continue
        for line, mod in imported_modules(f, system.parent):
            parts = mod.split(".")
            if parts[0] != "system" or len(parts) < 2 or parts[1] == src:
                continue
            edges[(src, parts[1])].append(f"{f.relative_to(system.parent)}:{line} {mod}")
    return edges


def shortest_path(graph: dict[str, set[str]], src: str, dst: str) -> list[str] | None:
    """[src, ..., dst] along import edges (breadth first), or None when dst is not reachable."""
    prev: dict[str, str | None] = {src: None}
    frontier = [src]
    while frontier and dst not in prev:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    if dst not in prev:
        return None
    path = [dst]
    while prev[path[-1]] is not None:
        path.append(prev[path[-1]])
    return path[::-1]


def find_cycles(edges: Edges) -> list[list[str]]:
    """The cycles [a, b, ..., a] between units: every import edge a -> b with a way back from b to a,
    closed by the shortest way back (each cycle once, starting at its smallest unit)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for a, b in edges:
        graph[a].add(b)
    cycles: dict[tuple[str, ...], list[str]] = {}
    for a, b in sorted(edges):
        back = shortest_path(graph, b, a)
        if back is None:
            continue
        ring = [a] + back[:-1]
        k = ring.index(min(ring))
        ring = ring[k:] + ring[:k]
        cycles.setdefault(tuple(ring), ring + [ring[0]])
    return [cycles[k] for k in sorted(cycles)]


def describe(cycle: list[str], edges: Edges) -> str:
    lines = [" -> ".join(cycle)]
    for a, b in zip(cycle, cycle[1:]):
        lines.append(f"  {a} -> {b}:")
        lines += [f"    {where}" for where in edges[(a, b)]]
    return "\n".join(lines)


def test_no_import_cycle_between_system_subpackages():
    edges = import_edges()
    cycles = find_cycles(edges)
    assert not cycles, "import cycles between system/ subpackages:\n" + "\n".join(describe(c, edges) for c in cycles)


def test_every_unit_under_system_has_a_layer():
    units = {unit_of(f) for f in SYSTEM.rglob("*.py")} - {"__init__"}
    assert units, "no modules found under system/"
    missing = sorted(units - set(LAYERS))
    assert not missing, f"place {missing} in LAYERS (tests/system/test_layering.py): which layers may they import?"


def test_imports_point_down_the_layers():
    rank = {u: i for i, u in enumerate(LAYERS)}
    upward = [f"{a} (layer {rank[a]}) imports {b} (layer {rank[b]}):\n" + "\n".join(f"    {w}" for w in where)
              for (a, b), where in sorted(import_edges().items())
              if a in rank and b in rank and rank[b] > rank[a]]
    assert not upward, f"imports against the order {' < '.join(LAYERS)}:\n" + "\n".join(upward)


def test_the_checks_see_lazy_imports_and_report_a_cycle(tmp_path):
    """The checker itself: a function-level import closes a cycle, and the report names it with files."""
    pkg = tmp_path / "system"
    for sub in ("a", "b"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "a" / "x.py").write_text("from system.b.y import f\n")
    (pkg / "b" / "y.py").write_text("def f():\n    from ..a import x\n    return x\n")  # lazy and relative
    edges = import_edges(pkg)
    cycles = find_cycles(edges)
    assert cycles == [["a", "b", "a"]]
    assert describe(cycles[0], edges) == ("a -> b -> a\n  a -> b:\n    system/a/x.py:1 system.b.y\n"
                                          "  b -> a:\n    system/b/y.py:2 system.a")
