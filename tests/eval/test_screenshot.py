"""Headless Chromium renders the report (skipped where Chromium is not installed)."""
from __future__ import annotations

import importlib.util
import struct
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "report_screenshot.py"


def _script():
    spec = importlib.util.spec_from_file_location("report_screenshot", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_report_screenshot(tiny_run: Path) -> None:
    mod = _script()
    if mod.find_chromium() is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    out = tiny_run / "shot.png"
    assert mod.main([str(tiny_run), "--out", str(out), "--height", "1600"]) == 0
    head = out.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", head[16:24]) == (1280, 1600)
