import pytest
import yaml

from graftkd.config import ExperimentConfig, load_config, parse_override
from graftkd.errors import UserError


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_and_overrides(tmp_path):
    p = write(tmp_path, "name: t\nmethod:\n  name: kd\n  temperature: 3\n")
    cfg = load_config(p, ["method.temperature=2.5", "optimizer.lr=0.01", "data.split.train=0.6"])
    assert cfg.method.name == "kd" and cfg.method.temperature == 2.5
    assert cfg.optimizer.lr == 0.01
    assert cfg.run_dir.name == "t"


def test_misspelt_key_names_key_and_closest(tmp_path):
    p = write(tmp_path, "optimizer:\n  lrr: 0.1\n")
    with pytest.raises(UserError) as e:
        load_config(p)
    msg = str(e.value)
    assert "optimizer.lrr" in msg and "optimizer.lr" in msg and "\n" not in msg


def test_misspelt_method_key_inside_discriminated_union(tmp_path):
    p = write(tmp_path, "method:\n  name: dkd\n  betta: 2\n")
    with pytest.raises(UserError, match=r"unknown config key 'method\.betta'; did you mean 'method\.beta'"):
        load_config(p)


def test_misspelt_top_level_section(tmp_path):
    with pytest.raises(UserError, match=r"'trainr'.*'trainer'"):
        load_config(write(tmp_path, "trainr: {epochs: 2}\n"))


def test_misspelt_key_in_teacher_list(tmp_path):
    with pytest.raises(UserError, match=r"'teachers\.0\.checkpiont'.*'teachers\.0\.checkpoint'"):
        load_config(write(tmp_path, "teachers:\n  - name: resnet8\n    checkpiont: x.pt\n"))


def test_wrong_type_and_range_name_key_and_value(tmp_path):
    with pytest.raises(UserError, match=r"trainer\.epochs' = 'many'"):
        load_config(None, ["trainer.epochs=many"])
    with pytest.raises(UserError, match=r"optimizer\.lr' = -1"):
        load_config(None, ["optimizer.lr=-1"])


def test_unknown_method_name():
    with pytest.raises(UserError, match="unknown method 'kdd'"):
        load_config(None, ["method.name=kdd"])


def test_split_fractions_must_sum_to_one():
    with pytest.raises(UserError, match="sum to 1"):
        load_config(None, ["data.split.train=0.9"])


def test_override_syntax_errors(tmp_path):
    with pytest.raises(UserError, match="key.sub=value"):
        parse_override("novalue")
    with pytest.raises(UserError, match="'seed' is a value, not a section"):
        load_config(write(tmp_path, "seed: 3\n"), ["seed.x=1"])


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_yaml_is_safe_loaded(tmp_path):
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(write(tmp_path, "name: !!python/object/apply:os.system ['echo hi']\n"))


def test_resolved_dump_round_trips(tmp_path):
    from graftkd.config import config_to_yaml, validate_config

    cfg = load_config(None, ["method.name=atf", "teachers=[{name: resnet8}]"])
    again = validate_config(yaml.safe_load(config_to_yaml(cfg)))
    assert again == cfg
    assert isinstance(again, ExperimentConfig)


def test_a_resolved_config_reloads_to_the_same_config_for_every_method():
    """The run folder's config.yaml (and a study's job file) is the resolved config: validating it again
    must give the same config, also when the run's length is trainer.steps (a method's epoch defaults
    are cleared then, not left to contradict the budget)."""
    import yaml

    import graftkd.methods  # noqa: F401  registers every method
    from graftkd.config import METHOD_CONFIGS, config_to_yaml, validate_config

    for name in METHOD_CONFIGS:
        for trainer in ({}, {"steps": 37, "epochs": None}):
            cfg = validate_config({"trainer": trainer, "method": {"name": name}})
            again = validate_config(yaml.safe_load(config_to_yaml(cfg)))
            assert again == cfg, (name, trainer)
