import pytest
import timm
import torch
from torch import nn

from graftkd.errors import UserError
from graftkd.models import MODELS, create_model
from graftkd.models.staged import (
    GraftedStudent,
    StagedModel,
    check_compatible,
    compose_1x1,
    fold_into_linear,
    junction_slots,
    make_bridge,
)


@pytest.mark.parametrize("name,stages,shapes", [
    ("resnet8", 3, [(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8)]),
    ("wrn_16_2", 3, [(16, 32, 32), (32, 32, 32), (64, 16, 16), (128, 8, 8)]),
    ("vgg8", 5, [(3, 32, 32), (64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 4, 4), (512, 4, 4)]),
    ("vgg16_graft", 5, [(3, 32, 32), (64, 16, 16), (128, 8, 8), (256, 4, 4), (256, 2, 2), (256, 1, 1)]),
])
def test_view_of_our_family_equals_forward(name, stages, shapes):
    model = MODELS.get(name)(num_classes=5).eval()
    view = StagedModel(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(view(x), model(x))
    assert view.n_stages == stages and view.boundary_shapes(32) == shapes
    assert all(p1 is p2 for p1, p2 in zip(view.stage_module(0).parameters(), model.get_submodule(view.stage_names[0]).parameters()))


def test_view_of_timm_resnet18():
    model = timm.create_model("resnet18", num_classes=3).eval()
    view = StagedModel(model)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(view(x), model(x))
    assert view.stem_names == ("conv1", "bn1", "act1", "maxpool") and view.head_linear == "fc"
    assert view.boundary_shapes(64) == [(64, 16, 16), (64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 2, 2)]


def test_unsupported_model_is_refused():
    with pytest.raises(UserError, match="Sequential has no stage view"):
        StagedModel(nn.Sequential(nn.Conv2d(3, 3, 1)))


def test_mismatch_messages_name_stage_and_shapes():
    r8, vgg8, vgg16 = (StagedModel(MODELS.get(n)(num_classes=2), n) for n in ("resnet8", "vgg8", "vgg16"))
    with pytest.raises(UserError, match=r"resnet8 has 3 \('layer1', 'layer2', 'layer3'\), vgg8 has 5"):
        check_compatible(r8, vgg8, 32)
    with pytest.raises(UserError) as e:
        check_compatible(vgg16, vgg8, 32)
    assert str(e.value) == ("grafting needs equal spatial sizes at every stage boundary; at 32 px the output of "
                            "stage 3 (block3) is (512, 2, 2) (C, H, W) in vgg16 but (512, 4, 4) in vgg8")
    pairs = check_compatible(StagedModel(MODELS.get("wrn_16_2")(num_classes=2)),
                             StagedModel(MODELS.get("wrn_40_1")(num_classes=2)), 16)
    assert [(t[0], s[0]) for t, s in pairs] == [(16, 16), (32, 16), (64, 32), (128, 64)]


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


def test_grafted_student_rebuilds_by_name():
    assert junction_slots(StagedModel(MODELS.get("resnet8")())) == [0, 1]
    assert junction_slots(StagedModel(MODELS.get("wrn_40_1")())) == [0, 1, 2]
    g = create_model("graft:resnet8", num_classes=4)
    assert isinstance(g, GraftedStudent) and sorted(g.junctions) == ["0", "1"]
    x = torch.randn(2, 3, 16, 16)
    g.eval()
    with torch.no_grad():
        assert torch.equal(g(x), g.net(x))  # identity junctions
