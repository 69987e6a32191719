"""A run folder tells the truth (issue 21, guarantee 4), one line for every user error (5) and
ambiguous data is an error (6). One tiny finished run is shared by the module."""
from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
import torch

from graftkd.cli import main
from graftkd.config import load_config
from graftkd.errors import UserError
from graftkd.files import load_checkpoint, save_checkpoint

from .test_bad_input import TINY, assert_one_line_error, write_png


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path, list[str]]:
    root = tmp_path_factory.mktemp("truth")
    tree = root / "images"
    for c, name in enumerate(("benign", "malignant")):
        for i in range(8):
            write_png(tree / name / f"{i}.png", seed=10 * c + i)
    (root / "exp.yaml").write_text("name: t\n")
    args = ["-c", str(root / "exp.yaml"), *TINY, "trainer.epochs=1", "data.source=folder", f"data.root={tree}",
            f"output.dir={root / 'runs'}"]
    assert main(["train", *args]) == 0
    return root / "runs" / "t", tree, args


def test_evaluate_on_other_data_writes_beside_the_runs_metrics(run, tmp_path, capsys) -> None:
    run_dir, tree, _ = run
    other = tmp_path / "other"
    for c, name in enumerate(("benign", "malignant")):
        for i in range(6):
            write_png(other / name / f"{i}.png", seed=100 + 10 * c + i)
    before = (run_dir / "metrics.json").read_bytes()
    assert main(["evaluate", str(run_dir), f"data.root={other}"]) == 0
    assert (run_dir / "metrics.json").read_bytes() == before  # the run's own scores are never replaced
    written = list((run_dir / "evaluations").glob("*/metrics.json"))
    assert len(written) == 1 and written[0].parent.name.startswith("folder-")
    m = json.loads(written[0].read_text())
    assert m["data"]["root"] == str(other) and m["test"]["n"] > 0 and m["run"] == str(run_dir)
    assert f"wrote {written[0]}" in capsys.readouterr().out


def test_non_finite_weights_are_refused_naming_the_tensor(run, tmp_path, capsys) -> None:
    run_dir, tree, args = run
    state = load_checkpoint(run_dir / "model.pt")
    key = next(k for k, v in state["state_dict"].items() if v.is_floating_point() and v.numel() > 1)
    state["state_dict"][key] = state["state_dict"][key].clone()
    state["state_dict"][key].view(-1)[0] = float("nan")
    bad = tmp_path / "nan.pt"
    save_checkpoint(bad, {k: v for k, v in state.items() if k != "format"})
    image = next(tree.rglob("*.png"))
    expect = [str(bad), f"tensor '{key}'", "non-finite"]
    for argv in (["evaluate", str(bad), "-c", args[1], *args[2:]], ["predict", str(bad), str(image)],
                 ["export", str(bad), "--out", str(tmp_path / "exp")], ["distill", *args, "method.name=kd",
                                                                       f"teachers=[{{name: resnet8, checkpoint: {bad}}}]",
                                                                       "output.name=kd"]):
        assert_one_line_error(main(argv), capsys.readouterr().err, *expect)
    assert not (tmp_path / "exp").exists() or not any((tmp_path / "exp").iterdir())


def test_no_metric_from_non_finite_outputs() -> None:
    from graftkd.data.types import Record
    from graftkd.eval.metrics import evaluate_predictions

    logits = torch.tensor([[1.0, 0.0], [float("nan"), 0.0], [0.0, 1.0]])
    records = [Record(f"img{i}.png", i % 2, f"g{i}") for i in range(3)]
    with pytest.raises(UserError, match=r"non-finite outputs \(NaN or inf\) on 1 of 3 images, e.g. img1.png"):
        evaluate_predictions(logits, torch.tensor([0, 1, 0]), records, ["a", "b"])


def test_an_export_is_complete_or_absent_with_the_mode_of_other_outputs(run, tmp_path, monkeypatch) -> None:
    import graftkd.export as ex

    run_dir = run[0]
    out = tmp_path / "export"

    def broken(*a, **k):
        raise RuntimeError("the ONNX exporter failed")

    monkeypatch.setattr(ex, "onnx_bytes", broken)
    with pytest.raises(RuntimeError):
        ex.export_model(run_dir, ("safetensors", "onnx"), out)
    assert list(out.iterdir()) == []  # no safetensors without its card
    monkeypatch.undo()
    written = ex.export_model(run_dir, ("safetensors",), out)
    umask = os.umask(0)
    os.umask(umask)
    modes = {stat.S_IMODE(p.stat().st_mode) for p in written.values()}
    assert modes == {0o666 & ~umask} == {stat.S_IMODE((run_dir / "metrics.json").stat().st_mode)}
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in written.values())


# ----------------------------------------------------------------------------- user errors
@pytest.mark.parametrize("override, culprit", [
    ("seed=-1", "seed"), (f"seed={2**70}", "seed"), ("data.split.seed=-3", "data.split.seed"),
    ("data.std=[0,0,0]", "data.std"), ("data.std=[0.2,0.0,0.2]", "data.std"), ("data.batch_size=0", "data.batch_size"),
])
def test_values_that_cannot_work_are_refused_by_the_schema(override: str, culprit: str) -> None:
    with pytest.raises(UserError, match=culprit.replace(".", r"\.")):
        load_config(None, [override])


def test_argument_counts_below_one_are_refused(run, capsys) -> None:
    run_dir, tree, _ = run
    image = str(next(tree.rglob("*.png")))
    for argv in (["predict", str(run_dir), image, "--batch-size", "0"],
                 ["evaluate", str(run_dir), "--latency", "--repeats", "0"], ["compare", "x.yaml", "--jobs", "0"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and "must be >= 1, got 0" in err[-1], err


def test_duplicate_yaml_keys_and_non_utf8_configs_are_one_line_errors(tmp_path: Path, capsys) -> None:
    dup = tmp_path / "dup.yaml"
    dup.write_text("name: a\ntrainer:\n  epochs: 2\noptimizer:\n  lr: 0.1\ntrainer:\n  steps: 5\n")
    rc = main(["train", "-c", str(dup)])
    assert_one_line_error(rc, capsys.readouterr().err, str(dup), "duplicate key 'trainer' on line 6",
                          "first given on line 2")
    merged = tmp_path / "merge.yaml"  # YAML merge keys may still be overridden
    merged.write_text("opt: &o\n  lr: 0.1\n  momentum: 0.5\noptimizer:\n  <<: *o\n  lr: 0.2\n")
    from graftkd.config import read_yaml
    assert read_yaml(merged)["optimizer"] == {"lr": 0.2, "momentum": 0.5}
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("name: caf\xe9\n".encode("latin-1"))
    rc = main(["train", "-c", str(latin)])
    assert_one_line_error(rc, capsys.readouterr().err, str(latin), "not UTF-8", "0xe9")


def test_synth_onto_an_existing_file_is_one_line(tmp_path: Path, capsys) -> None:
    target = tmp_path / "file.txt"
    target.write_text("keep me")
    assert_one_line_error(main(["synth", str(target)]), capsys.readouterr().err, str(target), "is a file")
    assert target.read_text() == "keep me"


# ------------------------------------------------------------------------- ambiguous data
def _manifest(tmp_path: Path, rows: list[tuple[str, str]]) -> Path:
    for p, _ in rows:
        if not (tmp_path / p).exists():
            write_png(tmp_path / p, seed=len(p))
    path = tmp_path / "m.csv"
    path.write_text("path,label\n" + "".join(f"{p},{lab}\n" for p, lab in rows))
    return path


def test_one_image_under_two_labels_is_an_error_naming_it(tmp_path: Path) -> None:
    from graftkd.data.sources import read_csv_manifest

    m = _manifest(tmp_path, [("a.png", "benign"), ("b.png", "malignant"), ("a.png", "malignant")])
    with pytest.raises(UserError, match=r"lines 2 and 4: image .*a\.png is listed under two labels "
                                        r"\('benign' and 'malignant'\)"):
        read_csv_manifest(m, "error")


@pytest.mark.parametrize("spelling", ["Benign", " BENIGN"])
def test_labels_differing_only_in_case_or_spaces_name_both_spellings(tmp_path: Path, spelling: str) -> None:
    from graftkd.data.sources import check_label_spellings, read_csv_manifest, read_folder

    m = _manifest(tmp_path, [("a.png", "benign"), ("b.png", "malignant"), ("c.png", spelling)])
    with pytest.raises(UserError, match=f"labels 'benign' and '{spelling.strip()}' differ only in case or spaces"):
        read_csv_manifest(m, "error")  # the CSV reader strips cells: ' BENIGN' is 'BENIGN'
    with pytest.raises(UserError, match=f"labels 'benign' and 'benign ' differ only in case or spaces"):
        check_label_spellings(["benign", "malignant", "benign "], "x")
    for cls in ("benign", "malignant", spelling.strip()):
        write_png(tmp_path / "tree" / cls / "0.png", seed=1)
    with pytest.raises(UserError, match=f"labels '{spelling.strip()}' and 'benign' differ only in case"):
        read_folder(tmp_path / "tree", "error")


def test_a_given_few_shot_set_leaving_a_class_without_labels_names_the_class(run, tmp_path, capsys) -> None:
    run_dir, tree, args = run
    splits = (run_dir / "splits.csv").read_text().splitlines()
    train_benign = [line.split(",")[0] for line in splits[1:] if ",train" in line and "benign/" in line]
    shots = tmp_path / "shots.txt"
    shots.write_text("\n".join(train_benign[:1]) + "\n")
    rc = main(["train", *args, f"data.shots_file={shots}", "output.name=fewshot"])
    assert_one_line_error(rc, capsys.readouterr().err, "no labelled training image of class 'malignant'")
    assert not (run_dir.parent / "fewshot").exists()
