"""Hypothesis fuzzing of the parsers users feed: config overrides, BreakHis names, CSV manifests."""
from __future__ import annotations

import string
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from graftkd.config import ExperimentConfig, apply_override, load_config, parse_override
from graftkd.data.breakhis import SUBTYPES, parse_name
from graftkd.data.sources import read_csv_manifest
from graftkd.errors import UserError

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def field_paths(cls: type[BaseModel] = ExperimentConfig, prefix: str = "") -> list[str]:
    """Every dotted key of the schema (nested sections expanded)."""
    out = []
    for name, f in cls.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += field_paths(ann, f"{prefix}{name}.")
        else:
            out.append(f"{prefix}{name}")
    return out


KEYS = field_paths() + ["method.temperature", "method.stage1.lr", "teachers.0.name", "teachers.0", "method.name",
                        "method.divergence.kind"]
ident = st.text(string.ascii_lowercase + "_", min_size=1, max_size=8)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                    st.floats(allow_nan=False, allow_infinity=False, width=32), st.text(max_size=12))
yaml_values = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(ident, c, max_size=3),
                           max_leaves=6)
raw_values = st.one_of(st.text(max_size=20), yaml_values.map(lambda v: yaml.safe_dump(v, default_flow_style=True)))
keys = st.one_of(st.sampled_from(KEYS), st.lists(ident, min_size=1, max_size=4).map(".".join), st.text(max_size=12))


@FUZZ
@given(st.text(max_size=40))
def test_parse_override_raises_only_user_errors(text):
    try:
        parts, _ = parse_override(text)
    except UserError:
        return
    assert parts and all(parts)


@FUZZ
@given(st.lists(ident, min_size=1, max_size=4), yaml_values)
def test_override_round_trip(parts, value):
    text = ".".join(parts) + "=" + yaml.safe_dump(value, default_flow_style=True)
    got_parts, got = parse_override(text)
    assert (got_parts, got) == (parts, value)
    tree: dict = {}
    apply_override(tree, got_parts, got)
    node = tree
    for p in parts:
        node = node[p]
    assert node == value


@FUZZ
@given(st.lists(st.tuples(keys, raw_values), max_size=4))
def test_load_config_with_any_overrides_validates_or_raises_user_error(overrides):
    try:
        cfg = load_config(None, [f"{k}={v}" for k, v in overrides])
    except UserError as e:
        assert str(e)
        return
    assert isinstance(cfg, ExperimentConfig)
    assert ExperimentConfig.model_validate(cfg.model_dump()) == cfg  # the resolved config re-validates


@FUZZ
@given(st.text(max_size=60))
def test_breakhis_parser_never_raises(name):
    parsed = parse_name(name)
    assert parsed is None or parsed.magnification in (40, 100, 200, 400)


codes = st.sampled_from(sorted(SUBTYPES))


@FUZZ
@given(codes, st.integers(0, 99), st.text(string.ascii_letters + string.digits, min_size=1, max_size=10),
       st.sampled_from([40, 100, 200, 400]), st.integers(0, 9999), st.sampled_from(["", ".png", ".PNG", ".jpg"]))
def test_breakhis_name_round_trip(code, year, pid, mag, seq, ext):
    folder, tumor = SUBTYPES[code]
    cls = "B" if tumor == "benign" else "M"
    p = parse_name(f"SOB_{cls}_{code}-{year:02d}-{pid}-{mag}-{seq:03d}{ext}")
    assert p is not None
    assert (p.code, p.subtype, p.tumor_class, p.magnification, p.seq) == (code, folder, tumor, mag, seq)
    assert p.slide == f"SOB_{cls}_{code}-{year:02d}-{pid}"
    wrong = "M" if cls == "B" else "B"
    assert parse_name(f"SOB_{wrong}_{code}-{year:02d}-{pid}-{mag}-{seq:03d}{ext}") is None


cell = st.one_of(st.sampled_from(["a.png", "b.png", "missing.png", "", "0", "1", "benign", "-3", "train", "x"]),
                 st.text(max_size=8))
csv_text = st.one_of(
    st.lists(st.lists(cell, min_size=0, max_size=5).map(lambda r: ",".join(r)), max_size=5).map(
        lambda rows: "path,label,group,split\n" + "\n".join(rows)),
    st.text(max_size=80),
)


@FUZZ
@given(csv_text, st.sampled_from(["error", "skip"]))
def test_csv_manifest_reader_raises_only_user_errors(tmp_path, text, on_bad):
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(b"\x89PNG")
    manifest = tmp_path / "m.csv"
    manifest.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        records, classes, _ = read_csv_manifest(manifest, on_bad)
    except UserError:
        return
    assert records and all(0 <= r.label < len(classes) for r in records)
    assert all(Path(r.path).is_file() for r in records)


@FUZZ
@given(st.binary(max_size=60))
def test_csv_manifest_reader_on_binary_garbage(tmp_path, data):
    manifest = tmp_path / "m.csv"
    manifest.write_bytes(data)
    try:
        read_csv_manifest(manifest, "error")
    except UserError:
        pass
