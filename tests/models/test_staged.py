import pytest
import timm
import torch
from torch import nn

from graftkd.errors import UserError
from graftkd.models import MODELS, create_model
from graftkd.models.staged import (
    GraftedStudent,
    StagedModel,
    compose_1x1,
    fold_into_convs,
    fold_into_linear,
    junction_slots,
    make_bridge,
)


@pytest.mark.parametrize("name,stages,shapes", [
    ("resnet8", 4, [(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8)]),
    ("wrn_16_2", 4, [(16, 32, 32), (32, 32, 32), (64, 16, 16), (128, 8, 8)]),
    ("vgg8", 5, [(64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 4, 4), (512, 4, 4)]),
    ("vgg16_graft", 5, [(64, 16, 16), (128, 8, 8), (256, 4, 4), (256, 2, 2), (256, 1, 1)]),
])
def test_view_of_our_family_equals_forward_and_feature_contract(name, stages, shapes):
    model = MODELS.get(name)(num_classes=5).eval()
    view = StagedModel(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(view(x), model(x))
        final, maps = model.forward_intermediates(x)
        assert [tuple(f.shape[1:]) for f in maps] == shapes and torch.equal(final, maps[-1])
        assert torch.equal(model.forward_intermediates(x, indices=[-1], intermediates_only=True)[0], maps[-1])
        assert torch.equal(view.intermediates(x)[0][1], maps[1])
        assert model.forward_head(final, pre_logits=True).shape == (2, model.num_features)
    assert view.n_stages == stages and view.boundary_shapes(32) == shapes
    assert [f["num_chs"] for f in model.feature_info] == [s[0] for s in shapes]
    assert [f["reduction"] for f in model.feature_info] == [32 // s[1] for s in shapes]


@pytest.mark.parametrize("name,reductions,slots", [
    ("resnet10t", [2, 4, 8, 16, 32], [0]),  # identity shortcut (after the max-pool) in layer1
    ("regnetx_002", [2, 4, 8, 16, 32], []),
    ("mobilenetv3_small_050", [2, 4, 8, 16, 32], [0]),  # depthwise conv first in blocks.0
    ("efficientnet_b0", [2, 4, 8, 16, 32], []),
    ("convnext_atto", [4, 8, 16, 32], [0, 1, 2, 3]),  # LayerNorm before every downsample and in the head
])
def test_view_of_timm_cnns_from_feature_info(name, reductions, slots):
    model = timm.create_model(name, num_classes=3).eval()
    view = StagedModel(model, name)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(view(x), model(x), rtol=0, atol=0)
        maps = model.forward_intermediates(x, intermediates_only=True)
        ours, _ = view.intermediates(x)
        assert [m.shape for m in maps] == [m.shape for m in ours]
    assert [s.reduction for s in view.segments] == reductions
    assert view.channels == [f["num_chs"] for f in model.feature_info]
    assert junction_slots(view) == slots


def test_unsupported_model_is_one_line_naming_the_families():
    with pytest.raises(UserError) as e:
        StagedModel(nn.Sequential(nn.Conv2d(3, 3, 1)), "teacher 0")
    assert str(e.value).startswith("teacher 0: Sequential has no stage view (no feature_info naming its modules); "
                                   "graftkd views our CIFAR ResNet/WRN/VGG, timm ResNet/ResNet-D, RegNet, EfficientNet")
    assert "\n" not in str(e.value)


def test_bridges_identity_like_and_composition_exact():
    square = make_bridge(4, 4)
    x = torch.randn(2, 4, 3, 3)
    assert torch.equal(square(x), x)
    s2t, t2s = make_bridge(3, 5), make_bridge(5, 3)
    x3 = torch.randn(2, 3, 3, 3)
    assert torch.equal(t2s(s2t(x3)), x3)
    for conv in (s2t, t2s):
        nn.init.normal_(conv.weight)
        nn.init.normal_(conv.bias)
    joint = compose_1x1(s2t, t2s)
    assert joint.weight.shape == (3, 3, 1, 1)
    torch.testing.assert_close(joint(x3), t2s(s2t(x3)), rtol=0, atol=1e-5)
    fc = nn.Linear(3, 2)
    ref = fc(joint(x3).mean((2, 3)))
    fold_into_linear(joint, fc)
    torch.testing.assert_close(fc(x3.mean((2, 3))), ref, rtol=0, atol=1e-5)


def test_bias_free_map_folds_into_a_padded_strided_conv_exactly():
    g = torch.Generator().manual_seed(0)
    m = make_bridge(4, 4, bias=False)
    nn.init.normal_(m.weight, generator=g)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=True).double()
    m = m.double()
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64, generator=g)
    with torch.no_grad():
        ref = conv(m(x))
        fold_into_convs(m, (conv,))
        torch.testing.assert_close(conv(x), ref, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="with bias"):
        b = make_bridge(4, 4)
        nn.init.ones_(b.bias)
        fold_into_convs(b, (conv,))


def test_grafted_student_rebuilds_by_name():
    assert junction_slots(StagedModel(MODELS.get("resnet8")())) == [0]
    assert junction_slots(StagedModel(MODELS.get("wrn_40_1")())) == [0, 1, 2, 3]
    g = create_model("graft:resnet8", num_classes=4)
    assert isinstance(g, GraftedStudent) and sorted(g.junctions) == ["0"]
    x = torch.randn(2, 3, 16, 16)
    g.eval()
    with torch.no_grad():
        assert torch.equal(g(x), g.net(x))  # identity junctions
