"""Group splits: disjointness/coverage property, k-fold, official Folds.csv, splits.csv re-use."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from graftkd.config import DataConfig, SplitConfig
from graftkd.data import build_data
from graftkd.data.breakhis import read_breakhis
from graftkd.data.splits import assign_splits, deal, split_kfold
from graftkd.data.types import Record
from graftkd.errors import UserError

records_st = st.lists(
    st.tuples(st.integers(0, 14), st.integers(0, 2)), min_size=1, max_size=80
).map(lambda pairs: [Record(f"/x/{i}.png", lab, f"p{g}", {}) for i, (g, lab) in enumerate(pairs)])


@settings(max_examples=60, deadline=None)
@given(records=records_st, seed=st.integers(0, 2**31), kind=st.sampled_from(["fraction", "kfold"]),
       fold=st.integers(0, 2), val=st.sampled_from([0.0, 0.2, 0.5]))
def test_no_group_in_two_splits_and_full_coverage(records: list[Record], seed: int, kind: str, fold: int, val: float) -> None:
    cfg = SplitConfig(kind=kind, train=1 - 0.2 - val, val=val, test=0.2, k=3, fold=fold, val_fraction=val)
    if kind == "kfold" and len({r.group for r in records}) < 3:
        with pytest.raises(UserError, match="split.k=3 folds need at least 3 groups"):
            assign_splits(records, cfg, seed, None)
        return
    assign, desc = assign_splits(records, cfg, seed, None)
    assert len(assign) == len(records) and set(assign) <= {"train", "val", "test"}
    where: dict[str, set[str]] = {}
    for r, s in zip(records, assign):
        where.setdefault(r.group, set()).add(s)
    assert all(len(s) == 1 for s in where.values())
    assert "train" in assign  # at least one training group
    assert desc["seed"] == seed and assign_splits(records, cfg, seed, None)[0] == assign  # deterministic


def test_deal_exact_proportions() -> None:
    assert Counter(deal(10, [0.6, 0.2, 0.2])) == {0: 6, 1: 2, 2: 2}
    assert deal(5, [0.6, 0.2, 0.2]) == [0, 1, 0, 2, 0]
    assert deal(1, [0.3, 0.5, 0.2]) == [0]  # the first group always trains


def test_fraction_split_is_stratified_on_subtype(synth_tree: Path) -> None:
    records, _ = read_breakhis(synth_tree, "binary", "all", "error")
    assign, _ = assign_splits(records, SplitConfig(train=0.5, val=0.25, test=0.25), 3, None)
    patients = {s: {r.group for r, a in zip(records, assign) if a == s} for s in ("train", "val", "test")}
    assert [len(patients[s]) for s in ("train", "val", "test")] == [8, 4, 4]
    for s in ("val", "test"):  # 16 patients, 8 subtypes x 2: balanced classes in every part
        labels = Counter(r.label for r, a in zip(records, assign) if a == s)
        assert labels[0] == labels[1]


def test_kfold_each_group_tested_once(synth_tree: Path) -> None:
    records, _ = read_breakhis(synth_tree, "binary", "all", "error")
    tested: Counter = Counter()
    for fold in range(4):
        assign, desc = assign_splits(records, SplitConfig(kind="kfold", k=4, fold=fold, val_fraction=0.25), 0, None)
        test_groups = {r.group for r, a in zip(records, assign) if a == "test"}
        val_groups = {r.group for r, a in zip(records, assign) if a == "val"}
        assert len(test_groups) == 4 and len(val_groups) == 3  # 12 training patients, a quarter to val
        tested.update(test_groups)
    assert len(tested) == 16 and set(tested.values()) == {1}
    folds = split_kfold([r.group for r in records], {r.group: (0, "x") for r in records}, 4, 0)
    assert sorted(Counter(folds.values()).values()) == [4, 4, 4, 4]
    with pytest.raises(UserError, match="split.fold=4 must be < split.k=4"):
        assign_splits(records, SplitConfig(kind="kfold", k=4, fold=4), 0, None)


def test_official_folds_csv_honoured(tmp_path: Path, breakhis_tree: Path) -> None:
    records, _ = read_breakhis(breakhis_tree, "binary", "all", "error")
    test_patients = {"14-13412", "14-2523"}
    lines = ["fold,mag,grp,filename"]
    for fold in (1, 2):
        for r in records:
            grp = "test" if (r.group in test_patients) == (fold == 1) else "train"
            rel = Path(r.path).relative_to(breakhis_tree).as_posix()
            lines.append(f"{fold},{r.meta['magnification']},{grp},{rel}")
    folds = tmp_path / "Folds.csv"
    folds.write_text("\n".join(lines) + "\n")
    cfg = SplitConfig(kind="official", folds_csv=folds, fold=0, val_fraction=0.0)
    assign, desc = assign_splits(records, cfg, 0, None)
    assert {r.group for r, a in zip(records, assign) if a == "test"} == test_patients
    assert desc["official_fold"] == "1"
    assign2, _ = assign_splits(records, cfg.model_copy(update={"fold": 1, "val_fraction": 0.5}), 0, None)
    assert {r.group for r, a in zip(records, assign2) if a == "test"} == {r.group for r in records} - test_patients
    assign3, _ = assign_splits(records, cfg.model_copy(update={"val_fraction": 0.5}), 0, None)
    val = {r.group: r.label for r, a in zip(records, assign3) if a == "val"}
    assert sorted(val.values()) == [0, 1]  # half of each class's 2 train patients
    with pytest.raises(UserError, match="split.fold=2 but .* has 2 folds"):
        assign_splits(records, cfg.model_copy(update={"fold": 2}), 0, None)
    folds.write_text("\n".join(lines[:5]) + "\n")
    with pytest.raises(UserError, match=r"Folds.csv does not list 20 of the images"):
        assign_splits(records, cfg, 0, None)
    with pytest.raises(UserError, match="needs split.folds_csv"):
        assign_splits(records, SplitConfig(kind="official"), 0, None)


def test_splits_csv_written_and_reused(tmp_path: Path, synth_tree: Path) -> None:
    cfg = DataConfig(source="breakhis", root=synth_tree, image_size=16, decoded_cache="none")
    run = tmp_path / "runs" / "a"
    b1 = build_data(cfg, seed=5, run_dir=run)
    text = (run / "splits.csv").read_text().splitlines()
    assert text[0] == "path,label,group,split,magnification" and len(text) == 129
    assert text[1].startswith("BreaKHis_v1/histology_slides/breast/")  # relative to the data root
    cfg2 = cfg.model_copy(update={"split": SplitConfig(file=run / "splits.csv")})
    b2 = build_data(cfg2, seed=99, run_dir=None)
    for part in ("train", "val", "test"):
        assert [r.path for r in getattr(b1, part).records] == [r.path for r in getattr(b2, part).records]
    assert b1.info["groups"] == b2.info["groups"] and b2.info["split"]["kind"] == "file"
    lines = text[:1] + text[2:]
    (tmp_path / "short.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match="does not list 1 of the current records"):
        build_data(cfg.model_copy(update={"split": SplitConfig(file=tmp_path / "short.csv")}), 0, None)
