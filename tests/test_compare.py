"""`graftkd compare`: a tiny synthetic study end to end, run reuse, and the paired bootstrap."""
import json

import numpy as np
import pytest
import yaml

from graftkd.cli import main
from graftkd.config import load_config
from graftkd.experiment import execute
from graftkd.errors import UserError
from graftkd.study import build_jobs, load_study, paired_bootstrap

DATA = {"source": "synthetic", "image_size": 16, "batch_size": 8, "eval_batch_size": 64, "augment": "none",
        "synthetic": {"patients": 8, "images_per_patient": 2, "size": [32, 32], "magnifications": [40, 100]},
        "split": {"kind": "fraction", "train": 0.5, "val": 0.25, "test": 0.25, "seed": 0}}


def write_study(tmp_path, teacher):
    study = {
        "name": "tiny", "out": str(tmp_path / "study"), "data": DATA,
        "teachers": [{"name": "resnet8", "checkpoint": str(teacher)}], "student": {"name": "resnet8"},
        "common": {"trainer": {"device": "cpu", "threads": 1}, "output": {"tensorboard": False}},
        "shots": [2], "seeds": [0, 1], "steps": 3, "baseline": "scratch", "bootstrap": 200,
        "methods": {"scratch": {"method": {"name": "supervised"}, "teachers": []},
                    "kd": {"method": {"name": "kd"}, "fusion": {"strategy": "best"}}},
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    cfg = load_config(None, [f"data={json.dumps({**DATA, 'root': str(out / 'data')})}", "model.name=resnet8",
                             "trainer.steps=2", "trainer.progress=false", "trainer.device=cpu",
                             "output.tensorboard=false", f"output.dir={out}", "output.name=t"])
    return execute(cfg) / "model.pt"


def test_compare_runs_every_method_and_seed_on_one_budget_and_reuses_finished_runs(tmp_path, teacher, capsys):
    study = write_study(tmp_path, teacher)
    assert main(["compare", str(study), f"data.root={tmp_path / 'data'}", "--results", str(tmp_path / "r.json")]) == 0
    printed = capsys.readouterr().out
    res = json.loads((tmp_path / "r.json").read_text())
    assert res == json.loads((tmp_path / "study" / "compare.json").read_text())
    assert res["revision"] and res["command"].startswith("graftkd compare ") and res["runs_reused"] == 0
    rows = {r["method"]: r for r in res["rows"]}
    assert set(rows) == {"scratch", "kd", "teacher_resnet8"} and rows["teacher_resnet8"]["reference"]
    for name in ("scratch", "kd"):
        r = rows[name]
        assert r["seeds"] == [0, 1] and r["steps"] == 3 and len(r["values"]) == 2
        assert r["mean"] == pytest.approx(np.mean(r["values"])) and r["sd"] == pytest.approx(np.std(r["values"], ddof=1))
        assert r["test_patients"] < r["test_images"] and len(r["patient_recognition_rate"]["values"]) == 2
    (diff,) = [d for d in res["differences"] if d["metric"] == "accuracy"]
    assert diff["method"] == "kd" and diff["baseline"] == "scratch" and diff["unit"] == "patient"
    assert diff["values"] == pytest.approx([a - b for a, b in zip(rows["kd"]["values"], rows["scratch"]["values"])])
    assert diff["mean"] == pytest.approx(np.mean(diff["values"]))
    assert diff["ci95"][0] <= diff["mean"] <= diff["ci95"][1]
    assert (tmp_path / "study" / "compare.png").stat().st_size > 1000
    assert "| kd | 2 |" in printed and "baseline" in printed

    # the same study again reuses all four runs; a changed resolved config (here lr) runs them again
    assert main(["compare", str(study), f"data.root={tmp_path / 'data'}"]) == 0
    assert json.loads((tmp_path / "study" / "compare.json").read_text())["runs_reused"] == 4
    assert main(["compare", str(study), f"data.root={tmp_path / 'data'}", "--methods", "kd"]) == 0
    sub = json.loads((tmp_path / "study" / "compare.json").read_text())
    assert sub["runs_reused"] == 2 and {r["method"] for r in sub["rows"]} == {"kd", "teacher_resnet8"}
    capsys.readouterr()
    assert main(["compare", str(study), f"data.root={tmp_path / 'data'}", "common.optimizer.lr=0.01", "--dry-run"]) == 0
    assert capsys.readouterr().out.count("run   ") == 4


def test_study_owns_seeds_shots_and_steps(tmp_path, teacher):
    study = write_study(tmp_path, teacher)
    with pytest.raises(UserError, match="methods.kd sets trainer.steps"):
        load_study(study, ["methods.kd.trainer.steps=10"])
    with pytest.raises(UserError, match="baseline 'dkd'"):
        load_study(study, ["baseline=dkd"])
    jobs = build_jobs(load_study(study, ["shots=[2,4]"]))
    assert [(j.method, j.shots, j.seed) for j in jobs][:3] == [("scratch", 2, 0), ("kd", 2, 0), ("scratch", 2, 1)]
    assert {(j.cfg.trainer.steps, j.cfg.trainer.epochs) for j in jobs} == {(3, None)}
    assert jobs[-1].cfg.data.shots == 4 and jobs[0].cfg.teachers == [] and len(jobs[1].cfg.teachers) == 1


def test_paired_bootstrap_matches_the_explicit_resampling_loop():
    rng = np.random.default_rng(1)
    num = rng.integers(-2, 3, size=(3, 7)).astype(float)  # 3 seeds, 7 units: correct(method) - correct(baseline)
    den = rng.integers(1, 4, size=7).astype(float)  # images per unit
    V = rng.multinomial(3, [1 / 3] * 3, size=50).astype(float)
    W = rng.multinomial(7, [1 / 7] * 7, size=50).astype(float)
    out = paired_bootstrap(num, den, 50, draws=(V, W))
    stats = []
    for v, w in zip(V, W):
        seeds = np.repeat(np.arange(3), v.astype(int))
        units = np.repeat(np.arange(7), w.astype(int))
        stats.append(np.mean([num[s, units].sum() / den[units].sum() for s in seeds]))
    assert out["ci95"] == pytest.approx(np.percentile(stats, [2.5, 97.5]).tolist())
    assert out["mean"] == pytest.approx(np.mean(num.sum(1) / den.sum()))


def test_paired_bootstrap_of_a_constant_difference_is_that_constant_and_intervals_shrink_with_images():
    out = paired_bootstrap(np.full((4, 10), 0.5), np.ones(10), 300)
    assert out["mean"] == 0.5 and out["ci95"] == [0.5, 0.5]
    rng = np.random.default_rng(0)
    widths = []
    for n in (50, 2000):
        num = (rng.random((5, n)) < 0.6).astype(float) - (rng.random((5, n)) < 0.5).astype(float)
        ci = paired_bootstrap(num, np.ones(n), 500, seed=3)["ci95"]
        widths.append(ci[1] - ci[0])
    assert widths[1] < widths[0] / 3


def test_a_diverging_run_is_recorded_and_the_study_goes_on(tmp_path, teacher, capsys):
    study = write_study(tmp_path, teacher)
    bad = "methods.bad={method: {name: supervised}, teachers: [], optimizer: {lr: 1.0e+30}}"
    assert main(["compare", str(study), f"data.root={tmp_path / 'data'}", "seeds=[0]", bad]) == 0
    res = json.loads((tmp_path / "study" / "compare.json").read_text())
    assert [(f["method"], f["seed"]) for f in res["failures"]] == [("bad", 0)]
    assert "non-finite loss" in res["failures"][0]["error"]
    rows = {r["method"]: r for r in res["rows"]}
    assert rows["bad"]["mean"] is None and rows["scratch"]["values"] and rows["kd"]["values"]
    assert "Failed runs" in capsys.readouterr().out


def _crash(cfg_file, log_file, conn):
    """A run whose process dies without a word (as on a segfault or the out-of-memory killer)."""
    import os

    os._exit(7)


def test_warm_workers_and_submitit_executors_give_the_in_process_results(tmp_path, teacher):
    study = write_study(tmp_path, teacher)
    common = ["compare", str(study), f"data.root={tmp_path / 'data'}", "seeds=[0]"]
    values = {}
    for name, extra in {"in_process": [], "pool": ["--jobs", "2"], "debug": ["--executor", "debug"],
                        "local": ["--executor", "local", "--jobs", "2"]}.items():
        assert main(common + [f"out={tmp_path / name}", "--results", str(tmp_path / f"{name}.json")] + extra) == 0
        res = json.loads((tmp_path / f"{name}.json").read_text())
        assert not res["failures"] and res["executor"] == ("pool" if name in ("in_process", "pool") else name)
        values[name] = {r["method"]: r["values"] for r in res["rows"]}
        assert (tmp_path / name / "runs" / ".cache" / "scores").is_dir()  # the teacher's scores, once per study
    assert values["pool"] == values["in_process"] == values["debug"] == values["local"]
    assert "--executor local" in json.loads((tmp_path / "local.json").read_text())["command"]


def test_a_run_whose_process_dies_is_a_failed_run_and_the_pool_goes_on(tmp_path):
    from graftkd.study import WarmPool

    pool = WarmPool()
    try:
        assert pool.run(tmp_path / "no.yaml", tmp_path / "a.log", target=_crash) == "the run's process died (exit 7)"
        error = pool.run(tmp_path / "no.yaml", tmp_path / "b.log")  # the next run starts as usual
    finally:
        pool.close()
    assert error == f"config file not found: {tmp_path / 'no.yaml'}"
    assert "no.yaml" in (tmp_path / "b.log").read_text()
