import pytest
import torch

from graftkd.models import MODELS, StagedNet, count_params

CIFAR = [
    "resnet8", "resnet20", "resnet32", "resnet56", "resnet110", "resnet8x4", "resnet32x4",
    "wrn_16_2", "wrn_40_1", "wrn_40_2", "vgg8", "vgg13", "vgg16",
]

# published parameter counts for 100 classes (RepDistiller/CRD), in millions
PUBLISHED_100 = {"resnet8x4": 1.23, "resnet32x4": 7.43, "wrn_40_2": 2.26, "vgg13": 9.46}


def test_registry_lists_the_family():
    ours = {n for n in MODELS.names() if ":" not in n}  # other modules add prefixed builders (graft:)
    assert ours == set(CIFAR) | {"vgg16_graft"}
    assert MODELS.names("wrn_*") == ["wrn_16_2", "wrn_40_1", "wrn_40_2"]


@pytest.mark.parametrize("name", CIFAR + ["vgg16_graft"])
def test_output_shape_and_staged_view(name):
    x = torch.randn(2, 3, 32, 32)
    for c in (10, 100):
        model = MODELS.get(name)(num_classes=c).eval()
        with torch.no_grad():
            out = model(x)
            staged = model.forward_head(model.forward_features(x))
        assert isinstance(out, torch.Tensor) and out.shape == (2, c)
        assert torch.equal(out, staged)
    assert isinstance(model, StagedNet) and len(model.stage_names) in (3, 5)
    for s in model.stage_names:
        assert isinstance(getattr(model, s), torch.nn.Module)


@pytest.mark.parametrize("name,expected", sorted(PUBLISHED_100.items()))
def test_param_counts_match_published(name, expected):
    with torch.device("meta"):
        n = count_params(MODELS.get(name)(num_classes=100))
    assert abs(n / 1e6 - expected) / expected < 0.01


def test_exact_param_counts():
    # hand-derived: vgg13 convs 9,404,992 + BN 5,888 + fc 51,300; NetGraft vgg16 teacher (methods.md II.1.1)
    with torch.device("meta"):
        assert count_params(MODELS.get("vgg13")(num_classes=100)) == 9_462_180
        assert count_params(MODELS.get("vgg16")(num_classes=10)) == 14_983_498
        assert count_params(MODELS.get("vgg16_graft")(num_classes=10)) == 5_412_682


def test_stage_resolutions_at_32px():
    x = torch.randn(2, 3, 32, 32)
    r = MODELS.get("resnet8")(num_classes=10).eval()
    h = r.forward_stem(x)
    sizes = []
    for i in range(3):
        h = r.forward_stage(i, h)
        sizes.append(tuple(h.shape[1:]))
    assert sizes == [(16, 32, 32), (32, 16, 16), (64, 8, 8)]
    v = MODELS.get("vgg16")(num_classes=10).eval()
    assert v.forward_features(x).shape == (2, 512, 1, 1)
    assert MODELS.get("vgg8")(num_classes=10).forward_features(x).shape == (2, 512, 4, 4)


def test_other_input_sizes():
    m = MODELS.get("resnet8")(num_classes=3).eval()
    assert m(torch.randn(1, 3, 48, 40)).shape == (1, 3)
    v = MODELS.get("vgg8")(num_classes=3).eval()
    assert v.forward_features(torch.randn(1, 3, 64, 64)).shape == (1, 512, 4, 4)  # RepDistiller: pool3 at 64 px


def test_repdistiller_state_dict_keys():
    assert {"conv1.weight", "layer1.0.conv1.weight", "layer2.0.downsample.0.weight", "fc.bias"} <= set(
        MODELS.get("resnet8")(num_classes=10).state_dict()
    )
    assert {"block1.layer.0.convShortcut.weight", "bn1.running_mean", "fc.weight"} <= set(
        MODELS.get("wrn_16_2")(num_classes=10).state_dict()
    )
    keys = set(MODELS.get("vgg8")(num_classes=10).state_dict())
    assert {"block0.0.weight", "block0.1.running_var", "classifier.weight"} <= keys
    assert "block0.2.weight" not in keys  # the last ReLU of each block is applied in forward
