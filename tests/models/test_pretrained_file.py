"""`pretrained: /path/to/file`: local weights through timm's pretrained_cfg_overlay, checked key by key."""
import pytest
import timm
import torch
from safetensors.torch import save_file

from graftkd.config import ModelConfig
from graftkd.errors import UserError
from graftkd.models import MODELS, create_model


def test_timm_model_from_a_local_file_keeps_a_matching_head_and_drops_another(tmp_path):
    src = timm.create_model("resnet10t", num_classes=3)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    same = create_model("resnet10t", num_classes=3, pretrained=path)
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(), src.state_dict().values()))
    other = create_model("resnet10t", num_classes=5, pretrained=path)  # a new head, the body from the file
    assert other.fc.out_features == 5 and torch.equal(other.conv1[0].weight, src.conv1[0].weight)
    assert isinstance(ModelConfig(name="resnet10t", pretrained=str(path)).pretrained, type(path))


def test_mismatching_file_is_one_line_naming_file_and_key(tmp_path):
    pth = tmp_path / "r18.pth"
    torch.save({"state_dict": timm.create_model("resnet18", num_classes=3).state_dict()}, pth)
    with pytest.raises(UserError) as e:
        create_model("resnet10t", num_classes=3, pretrained=pth)
    assert str(e.value) == f"{pth}: does not fit 'resnet10t': it lacks key 'conv1.0.weight'"
    ours = tmp_path / "r8.pth"
    torch.save(MODELS.get("resnet20")(num_classes=3).state_dict(), ours)
    with pytest.raises(UserError, match=r"r8.pth: does not fit 'resnet8': it has key 'layer1.1.conv1.weight' that"):
        create_model("resnet8", num_classes=3, pretrained=ours)
    with pytest.raises(UserError, match="pretrained weights file not found"):
        create_model("resnet8", num_classes=3, pretrained=tmp_path / "nope.pth")
