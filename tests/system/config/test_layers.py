"""The import graph keeps its layers: system/config is a leaf (dataclasses + OmegaConf: nothing
else from system/, no torch), system/ imports no ray / deepspeed / torch.distributed, and no
function under cluster/ takes an untyped root config."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
    return out


def test_config_is_a_leaf():
    bad = {}
    for f in sorted((ROOT / "system" / "config").glob("*.py")):
        wrong = {m for m in imports(f) if (m.startswith("system.") and not m.startswith("system.config")) or m.split(".")[0] == "torch"}
        if wrong:
            bad[f.name] = sorted(wrong)
    assert not bad, f"system/config must import nothing else from system/ and not torch: {bad}"


def test_system_imports_no_ray_deepspeed_or_torch_distributed():
    bad = {}
    for f in sorted((ROOT / "system").rglob("*.py")):
        wrong = {m for m in imports(f) if m.split(".")[0] in ("ray", "deepspeed") or m.startswith("torch.distributed")}
        if wrong:
            bad[str(f.relative_to(ROOT))] = sorted(wrong)
    assert not bad, bad


def test_cluster_functions_take_typed_configs():
    untyped = []
    for f in sorted((ROOT / "cluster").glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for a in node.args.args + node.args.kwonlyargs:
                    if a.arg in ("cfg", "exp", "config") and (a.annotation is None or ast.unparse(a.annotation) in ("Any", "dict")):
                        untyped.append(f"{f.name}:{node.lineno} {node.name}({a.arg})")
    assert not untyped, f"cluster/ functions must take typed configs (or only the sections they use): {untyped}"
