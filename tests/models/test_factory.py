import pytest
import torch

from graftkd.errors import UserError
from graftkd.models import MODELS, create_model, format_model_table, list_models, load_model_file, save_model_file

META = dict(classes=["a", "b", "c"], mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], image_size=32)


def test_ours_first_and_timm_prefix():
    assert type(create_model("vgg13", 3)).__name__ == "CifarVGG"
    with torch.device("meta"):  # timm's vgg13 has a 100M-parameter head; shapes suffice
        timm_vgg = create_model("timm:vgg13", 3)
    assert type(timm_vgg).__module__.startswith("timm")


def test_timm_model_by_name():
    m = create_model("resnet18", 5).eval()
    assert m.get_classifier().out_features == 5
    with torch.no_grad():
        assert m(torch.randn(1, 3, 32, 32)).shape == (1, 5)


def test_unknown_name_suggests():
    with pytest.raises(UserError, match=r"unknown model 'resnet8x5'.*closest: resnet8x4"):
        create_model("resnet8x5", 10)


def test_ours_have_no_pretrained_weights():
    with pytest.raises(UserError, match="no pretrained weights"):
        create_model("resnet8", 10, pretrained=True)


def test_list_models_marks_ours():
    names = list_models("vgg1*")
    assert names[:3] == ["vgg13", "vgg16", "vgg16_graft"]
    assert "timm:vgg13" in names and "vgg11_bn" in names
    assert [n for n in names if n in MODELS] == ["vgg13", "vgg16", "vgg16_graft"]
    table = format_model_table("resnet8*", params=True).splitlines()
    assert table[0].split() == ["name", "source", "params@10"]
    assert table[1].split() == ["resnet8", "ours", "0.08M"]
    assert format_model_table("resnet8*").splitlines()[1].split() == ["resnet8", "ours"]  # no build without --params
    assert "no model matches" in format_model_table("zzz*")


def test_the_stored_model_index_is_the_live_registries_and_the_cli_lists_from_it(capsys):
    """`graftkd models` lists from models/index.json (no torch, no timm import): it must be current
    (`python -m graftkd.models.factory` rewrites it) and print what the live registries would."""
    from graftkd.cli import main
    from graftkd.commands import _stored_model_index
    from graftkd.models.factory import model_index

    assert _stored_model_index() == model_index()
    for pattern in ("vgg1*", "resnet8*", "zzz*"):
        assert main(["models", pattern]) == 0
        assert capsys.readouterr().out.strip() == format_model_table(pattern)


def _saved(tmp_path, name="resnet8", num_classes=3, **kw):
    model = create_model(name, num_classes, **kw).eval()
    path = save_model_file(tmp_path / "run" / "model.pt", model, arch=name, num_classes=num_classes,
                           extra={"model_kwargs": kw}, **META)
    return model, path


def test_round_trip(tmp_path):
    model, path = _saved(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    loaded, meta = load_model_file(path)
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert meta["kind"] == "model" and meta["arch"] == "resnet8" and meta["classes"] == ["a", "b", "c"]
    assert meta["image_size"] == 32 and meta["mean"] == [0.5] * 3 and "state_dict" not in meta
    via_run = create_model("resnet8", 3, checkpoint=tmp_path / "run").eval()  # run folder -> model.pt
    with torch.no_grad():
        assert torch.equal(model(x), via_run(x))


def test_round_trip_keeps_model_kwargs(tmp_path):
    _, path = _saved(tmp_path, "wrn_16_2", drop_rate=0.3)
    loaded, meta = load_model_file(path)
    assert loaded.block1.layer[0].drop_rate == 0.3 and meta["extra"]["model_kwargs"] == {"drop_rate": 0.3}


def test_class_count_mismatch(tmp_path):
    _, path = _saved(tmp_path)
    with pytest.raises(UserError, match=r"model\.pt: has 3 classes, expected 10"):
        create_model("resnet8", 10, checkpoint=path)


def test_arch_mismatch(tmp_path):
    _, path = _saved(tmp_path)
    with pytest.raises(UserError, match=r"model\.pt: holds a 'resnet8' model, not 'resnet20'"):
        create_model("resnet20", 3, checkpoint=path)


def test_state_dict_shape_mismatch_names_key(tmp_path):
    from graftkd.files import load_checkpoint, save_checkpoint

    _, path = _saved(tmp_path)
    state = load_checkpoint(path)
    state.pop("format")
    good = state["state_dict"]["layer1.0.conv1.weight"]
    state["state_dict"]["layer1.0.conv1.weight"] = torch.zeros(16, 16, 1, 1)
    save_checkpoint(path, state)
    with pytest.raises(UserError, match=r"'layer1\.0\.conv1\.weight' has shape \(16, 16, 1, 1\) in the file, \(16, 16, 3, 3\)"):
        load_model_file(path)
    state["state_dict"]["layer1.0.conv1.weight"] = good
    del state["state_dict"]["fc.bias"]
    save_checkpoint(path, state)
    with pytest.raises(UserError, match=r"lacks key 'fc\.bias'"):
        create_model("resnet8", 3, checkpoint=path)


def test_truncated_file(tmp_path):
    _, path = _saved(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"cannot load checkpoint .*model\.pt"):
        load_model_file(path)


def test_not_a_model_file(tmp_path):
    from graftkd.files import save_checkpoint

    path = save_checkpoint(tmp_path / "x.pt", {"kind": "trainer", "epoch": 3})
    with pytest.raises(UserError, match=r"x\.pt: not a model file"):
        load_model_file(path)
    with pytest.raises(UserError, match="checkpoint not found"):
        load_model_file(tmp_path / "missing.pt")
