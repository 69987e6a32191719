"""Decoding never crashes graftkd and never changes pixels silently (issue 21, guarantee 3).

Damaged files are generated (hypothesis draws single-byte corruptions of a PNG and a JPEG) and
decoded the way graftkd decodes: ``verify_images`` (worker processes), then ``decode_file`` for the
files it accepts, all inside a subprocess so that a native crash fails the test instead of pytest.
"""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from graftkd.data.datasets import decode_file, verify_images
from graftkd.data.pixels import DEFAULT_MAX_PIXELS

from .procs import env

# graftkd's decoding without torch (fast to start): the scan's verify_images, then decode_bytes,
# the function decode_file calls, in this process for every file the scan accepted
DECODE_ALL = r"""
import json, sys
from pathlib import Path
from graftkd.data.pixels import decode_bytes
from graftkd.data.verify import verify_images
assert "torch" not in sys.modules
out = {}
for p, v in verify_images(sys.argv[1:], workers=2).items():
    if isinstance(v, str):
        out[p] = v
    else:
        a = decode_bytes(Path(p).read_bytes())
        out[p] = {"shape": list(a.shape), "dtype": str(a.dtype), "pixels": a.transpose(2, 0, 1).flatten().tolist()}
print(json.dumps(out))
"""


def _image(fmt: str) -> bytes:
    rng = np.random.default_rng(0)
    arr = np.clip(rng.normal(128, 60, (24, 32, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _decode_in_subprocess(paths: list[Path]) -> dict[str, object]:
    p = subprocess.run([sys.executable, "-c", DECODE_ALL, *map(str, paths)], env=env(), capture_output=True,
                       text=True, timeout=240)
    assert p.returncode == 0, f"decoding crashed graftkd (exit {p.returncode}): {p.stderr[-2000:]}"
    return json.loads(p.stdout)


FLIPS = st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), min_size=12, max_size=12)


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(png_flips=FLIPS, jpeg_flips=FLIPS)
def test_single_byte_corruptions_decode_as_before_or_are_refused_in_one_line(tmp_path_factory, png_flips,
                                                                           jpeg_flips) -> None:
    folder = tmp_path_factory.mktemp("flips")
    clean = {"PNG": _image("PNG"), "JPEG": _image("JPEG")}
    before = {}
    for fmt, data in clean.items():
        (folder / f"clean.{fmt.lower()}").write_bytes(data)
        decoded = decode_file(str(folder / f"clean.{fmt.lower()}"))
        before[fmt] = {"shape": [*decoded.shape[1:], decoded.shape[0]], "dtype": "uint8",
                       "pixels": decoded.flatten().tolist()}
    paths, origin = [], {}
    for fmt, flips in (("PNG", png_flips), ("JPEG", jpeg_flips)):
        for i, (where, xor) in enumerate(flips):
            data = bytearray(clean[fmt])
            data[int(where * len(data))] ^= xor
            path = folder / f"{fmt}_{i}.{fmt.lower()}"
            path.write_bytes(bytes(data))
            paths.append(path)
            origin[str(path)] = fmt
    for path, result in _decode_in_subprocess(paths).items():
        if isinstance(result, str):  # refused: a one-line reason
            assert result and "\n" not in result and len(result) < 300, (path, result)
        elif origin[path] == "PNG":  # every byte of a PNG is under a CRC: accepted means unchanged
            assert result == before["PNG"], path
        else:  # JPEG has no checksum: a flipped byte may decode to other pixels, or (in a header) another
            # size, but always to a well-formed RGB uint8 image, never a crash
            height, width, channels = result["shape"]
            assert channels == 3 and result["dtype"] == "uint8", (path, result["shape"])
            assert 0 < height * width <= DEFAULT_MAX_PIXELS, (path, result["shape"])
            assert len(result["pixels"]) == height * width * 3, path


def test_a_flipped_png_byte_is_one_line_and_exit_2_through_the_cli(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    for c in ("a", "b"):
        for i in range(4):
            (tree / c).mkdir(parents=True, exist_ok=True)
            (tree / c / f"{i}.png").write_bytes(_image("PNG"))
    data = bytearray((tree / "a" / "0.png").read_bytes())
    data[len(data) // 2] ^= 0x40
    (tree / "a" / "0.png").write_bytes(bytes(data))
    p = subprocess.run([sys.executable, "-m", "graftkd", "data", "summary", "data.source=folder",
                        f"data.root={tree}", f"output.dir={tmp_path / 'runs'}"], env=env(), capture_output=True,
                       text=True, timeout=240)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and "a/0.png" in lines[0] and "CRC" in lines[0], p.stderr


def test_a_decoder_crash_marks_the_file_bad(tmp_path: Path, monkeypatch) -> None:
    """A worker that dies on a file (here: killed by SIGSEGV) marks that file, the others go on."""
    import graftkd.data.datasets as ds

    good = [tmp_path / f"{i}.png" for i in range(3)]
    for p in good:
        p.write_bytes(_image("PNG"))
    bomb = tmp_path / "crash.png"
    bomb.write_bytes(_image("PNG"))
    crash = ("import os, runpy, signal, sys\n"
             "class In:\n"
             "    def __iter__(self):\n"
             "        for line in sys.__stdin__:\n"
             "            if 'crash.png' in line: os.kill(os.getpid(), signal.SIGSEGV)\n"
             "            yield line\n"
             "sys.stdin = In()\n"
             "runpy.run_path(sys.argv[1], run_name='__main__')\n")
    monkeypatch.setattr(ds._Worker, "CMD", [sys.executable, "-I", "-c", crash, ds.pixels.__file__])
    out = verify_images([str(good[0]), str(bomb), str(good[1]), str(good[2])], workers=1)
    assert out[str(bomb)] == "the image decoder crashed on this file (signal 11); the file is damaged or hostile"
    assert all(out[str(p)] == (32, 24) for p in good)


def _save(arr: np.ndarray, mode: str, path: Path) -> Path:
    im = Image.fromarray(arr)
    assert im.mode == mode
    im.save(path)
    return path


def test_16_bit_and_float_images_are_scaled_not_truncated(tmp_path: Path) -> None:
    grey16 = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    img = decode_file(str(_save(grey16, "I;16", tmp_path / "g16.png")))
    assert img.shape == (3, 1, 4) and img[0, 0].tolist() == [0, 1, 128, 255] and (img[0] == img[2]).all()
    flt = np.array([[0.0, 0.5, 1.0, 0.2]], dtype=np.float32)
    assert decode_file(str(_save(flt, "F", tmp_path / "f.tif")))[1, 0].tolist() == [0, 128, 255, 51]
    out = verify_images([str(_save(flt * 300, "F", tmp_path / "big.tif"))])
    assert out[str(tmp_path / "big.tif")].startswith("float image with values outside [0, 1]")


def test_the_pixel_budget_is_checked_from_the_header_before_decoding(tmp_path: Path) -> None:
    """A PNG whose header says 30000 x 30000 (2.7 GB decoded) is refused by its header, before any
    data is decoded; the default budget is PIL's decompression-bomb limit, as is the config's default."""
    from graftkd.config import DataConfig

    assert DEFAULT_MAX_PIXELS == Image.MAX_IMAGE_PIXELS == DataConfig().max_pixels
    big = tmp_path / "bomb.png"
    import zlib
    raw = zlib.compress(b"\x00" * 30001 * 8, 9)  # the first rows only: the header alone must refuse it

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + (zlib.crc32(kind + data) & 0xFFFFFFFF).to_bytes(4, "big")

    ihdr = (30000).to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
    big.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b""))
    assert big.stat().st_size < 2_000_000
    assert verify_images([str(big)])[str(big)].startswith("30000 x 30000 = 900000000 pixels is over the pixel budget")


def test_predict_reads_every_format_training_reads(tmp_path: Path) -> None:
    from graftkd.data.pixels import IMAGE_SUFFIXES
    from graftkd.eval.predict import IMAGE_SUFFIXES as PREDICT_SUFFIXES, load_image

    assert PREDICT_SUFFIXES is IMAGE_SUFFIXES
    arr = np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    for suffix in (".bmp", ".tif", ".png", ".webp", ".gif"):
        path = tmp_path / f"x{suffix}"
        Image.fromarray(arr).save(path)
        assert load_image(path, lambda t: t).shape == (3, 8, 8), suffix
