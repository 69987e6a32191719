"""No code path unpickles arbitrary objects: every torch.load is weights_only=True, no raw pickle."""
from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "graftkd"


def _name(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def _kw(call: ast.Call, key: str) -> object:
    for k in call.keywords:
        if k.arg == key and isinstance(k.value, ast.Constant):
            return k.value.value
    return None


def unsafe_loads(root: Path) -> list[str]:
    """``file:line call`` for torch.load without weights_only=True, pickle.load(s) on the module
    (not a restricted Unpickler subclass), and numpy loads with allow_pickle=True."""
    bad = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            name = _name(node.func)
            unsafe = (name.endswith("torch.load") and _kw(node, "weights_only") is not True
                      or name in ("pickle.load", "pickle.loads", "pickle.Unpickler", "dill.load", "joblib.load")
                      or name in ("np.load", "numpy.load") and _kw(node, "allow_pickle") is True)
            if unsafe:
                bad.append(f"{path.relative_to(root.parent)}:{node.lineno} {name}")
    return bad


def test_source_tree_never_unpickles_arbitrary_objects():
    assert unsafe_loads(SRC) == []


def test_the_scan_catches_unsafe_calls(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "m.py").write_text("import torch, pickle, numpy as np\n"
                              "torch.load('a')\n"
                              "torch.load('a', weights_only=False)\n"
                              "torch.load('a', map_location='cpu', weights_only=True)\n"
                              "pickle.load(open('x', 'rb'))\n"
                              "np.load('x.npy', allow_pickle=True)\n"
                              "np.load('x.npy')\n")
    assert unsafe_loads(pkg) == ["pkg/m.py:2 torch.load", "pkg/m.py:3 torch.load", "pkg/m.py:5 pickle.load",
                                 "pkg/m.py:6 np.load"]
