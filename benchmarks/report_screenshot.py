"""Screenshot a run's report.html with headless Chromium (checks the embedded plots render).

    python benchmarks/report_screenshot.py RUN [--out report.png] [--height 3000]

Writes RUN/report.html first when it is missing. Needs /usr/bin/chromium (apt-get install chromium).
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars"]


def find_chromium() -> str | None:
    return next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)


def screenshot(html: Path, out: Path, width: int = 1280, height: int = 3000, timeout: float = 120.0) -> Path:
    """Render ``html`` to the PNG ``out``; RuntimeError when Chromium is missing or fails."""
    exe = find_chromium()
    if exe is None:
        raise RuntimeError("chromium not found (apt-get install -y chromium)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        cmd = [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={out.resolve()}",
               f"--window-size={width},{height}", html.resolve().as_uri()]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"chromium failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, metavar="RUN")
    p.add_argument("--out", type=Path, help="PNG path (default RUN/report.png)")
    p.add_argument("--height", type=int, default=3000)
    args = p.parse_args(argv)
    html = args.run / "report.html"
    if not html.is_file():
        from graftkd.eval.report import write_report

        write_report([args.run])
    out = screenshot(html, args.out or args.run / "report.png", height=args.height)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
