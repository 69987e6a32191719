"""CLI start-up imports only what a command needs: `--help` builds every subcommand's parser without
torch, timm, matplotlib, numpy or the pydantic schema; `models` lists from its stored index
(nothing heavy); `data summary` loads no matplotlib and no timm. Checked on ``sys.modules`` in a fresh interpreter, not by timing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
HEAVY = ("torch", "timm", "matplotlib", "numpy", "torchvision", "onnxruntime", "graftkd.config")

PROBE = """
import contextlib, io, json, sys
from graftkd.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    try:
        main(sys.argv[1:])
    except SystemExit:
        pass
print(json.dumps([m for m in %r if m in sys.modules]))
""" % (HEAVY,)


def loaded_after(*argv: str, cwd: Path) -> list[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", PROBE, *argv], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=300, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("argv", [["--help"], ["distill", "--help"], ["synth", "--help"], ["export", "--help"]])
def test_help_imports_no_torch(argv, tmp_path):
    assert loaded_after(*argv, cwd=tmp_path) == []


def test_models_and_data_summary_import_no_matplotlib(tmp_path):
    assert loaded_after("models", "resnet8*", cwd=tmp_path) == []  # listed from models/index.json
    tree = tmp_path / "tree"
    subprocess.run([sys.executable, "-m", "graftkd", "synth", str(tree), "--patients", "8", "--size", "24x24",
                    "--images-per-patient", "1", "--magnifications", "40"], cwd=tmp_path, check=True, timeout=300,
                   env=dict(os.environ, PYTHONPATH=str(SRC)), capture_output=True)
    loaded = loaded_after("data", "summary", f"data.root={tree}", "data.source=breakhis", "data.decoded_cache=none",
                          f"output.dir={tmp_path / 'runs'}", cwd=tmp_path)
    assert "torch" in loaded  # the probe sees a real data build...
    assert "matplotlib" not in loaded and "timm" not in loaded  # ...without the report and model stacks
