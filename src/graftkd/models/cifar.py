"""CIFAR model family of RepDistiller / mdistiller (ResNet, WRN, VGG) plus NetGraft's VGG16.

Layer shapes, names and initialisation follow RepDistiller (`models/resnet.py`, `wrn.py`, `vgg.py`),
so their state_dict keys match and their released checkpoints load. Every model is viewed as
``stem -> stages -> head``::

    forward(x) = forward_head(forward_features(x))
    forward_features(x) = stage_n(...stage_1(forward_stem(x)))   # pre-pool map
    forward_head(f) = fc(flatten(avgpool(final_act(f))))

``stage_names`` lists the stage submodules; ``forward_stage(i, x)`` runs stage i including any
parameter-free glue (VGG's ReLU + max-pool). Like a timm CNN, every model has ``feature_info``
(one dict per boundary: ``module``, ``num_chs``, ``reduction`` at a 32 px input: the stem's output
when the model has a stem, then each stage's), ``forward_intermediates`` (timm's signature: the
boundary maps) and ``forward_head(f, pre_logits=...)``. Pooling is adaptive, so any input size works; the
models are designed for 32x32 (after the last stage the map is 8x8 for ResNet/WRN, 4x4 for VGG).
Every ``forward`` returns logits only.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from graftkd.registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")


class StagedNet(nn.Module):
    """Base class: ``stem -> stages -> head``; subclasses set ``stage_names`` and the three hooks."""

    stage_names: tuple[str, ...] = ()
    #: name of the stem's last module (its feature_info entry), None when the model has no stem
    stem_module: str | None = None
    feature_info: list[dict[str, object]]

    def _set_feature_info(self, stem_chs: int | None, stage_chs: Sequence[int], reductions: Sequence[int]) -> None:
        """timm's ``feature_info``: the stem (if any) then every stage, with width and reduction."""
        names = ([self.stem_module] if self.stem_module else []) + list(self.stage_names)
        chs = ([stem_chs] if self.stem_module else []) + list(stage_chs)
        self.feature_info = [{"module": n, "num_chs": c, "reduction": r} for n, c, r in zip(names, chs, reductions)]

    def forward_stem(self, x: Tensor) -> Tensor:
        return x

    def forward_intermediates(self, x: Tensor, indices: int | Sequence[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False
                              ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """timm's contract: the maps at the ``feature_info`` boundaries (``indices``: the last n if an
        int, all if None, else those positions), and the final map unless ``intermediates_only``."""
        if output_fmt != "NCHW":
            raise ValueError("output_fmt must be NCHW")
        n = len(self.feature_info)
        take = list(range(n - indices, n)) if isinstance(indices, int) else list(range(n)) if indices is None else [
            i % n for i in indices]
        last = max(take) if stop_early and take else n - 1
        out: list[Tensor] = []
        offset = 1 if self.stem_module else 0
        x = self.forward_stem(x)
        if offset and 0 in take:
            out.append(x)
        for i in range(len(self.stage_names)):
            if i + offset > last:
                break
            x = self.forward_stage(i, x)
            if i + offset in take:
                out.append(x)
        return out if intermediates_only else (x, out)

    def forward_stage(self, i: int, x: Tensor) -> Tensor:
        return getattr(self, self.stage_names[i])(x)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.forward_stem(x)
        for i in range(len(self.stage_names)):
            x = self.forward_stage(i, x)
        return x

    def forward_head(self, f: Tensor, pre_logits: bool = False) -> Tensor:
        raise NotImplementedError

    def get_classifier(self) -> nn.Module:
        """timm's contract: the module that maps ``forward_head(f, pre_logits=True)`` to logits."""
        return getattr(self, "classifier", None) or self.fc

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _init_weights(model: nn.Module, linear_std: float | None) -> None:
    """Kaiming-normal (fan_out) convs with zero bias, BN 1/0; Linear ~ N(0, linear_std) with zero
    bias when ``linear_std`` is given, else PyTorch's default."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0.0, linear_std)
            nn.init.zeros_(m.bias)


# ---------------------------------------------------------------- ResNet (CIFAR, post-activation)


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class CifarResNet(StagedNet):
    """RepDistiller ResNet: stem conv1-bn1-relu, stages layer1..3 (n = (depth-2)/6 basic blocks,
    strides 1, 2, 2), head avgpool + fc."""

    stage_names = ("layer1", "layer2", "layer3")
    stem_module = "relu"

    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        cin = widths[0]
        for i, (cout, stride) in enumerate(zip(widths[1:], (1, 2, 2)), start=1):
            blocks = [BasicBlock(cin if j == 0 else cout, cout, stride if j == 0 else 1) for j in range(n)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            cin = cout
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        self.num_features = widths[3]
        self._set_feature_info(widths[0], widths[1:], (1, 1, 2, 4))
        _init_weights(self, linear_std=None)

    def forward_stem(self, x: Tensor) -> Tensor:
        return self.relu(self.bn1(self.conv1(x)))

    def forward_head(self, f: Tensor, pre_logits: bool = False) -> Tensor:
        f = torch.flatten(self.avgpool(f), 1)
        return f if pre_logits else self.fc(f)


# ---------------------------------------------------------------- Wide ResNet (pre-activation)


class WideBasic(nn.Module):
    """Pre-activation block: conv2(relu(bn2(conv1(relu(bn1(x)))))) + shortcut (RepDistiller naming)."""

    def __init__(self, cin: int, cout: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = cin == cout
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pre = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(pre)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        # as in RepDistiller: an unequal-width shortcut takes the pre-activated input
        return out + (x if self.convShortcut is None else self.convShortcut(pre))


class NetworkBlock(nn.Module):
    def __init__(self, n: int, cin: int, cout: int, stride: int, drop_rate: float) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *[WideBasic(cin if i == 0 else cout, cout, stride if i == 0 else 1, drop_rate) for i in range(n)]
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(StagedNet):
    """RepDistiller WRN-d-k: stem conv1, stages block1..3 (n = (d-4)/6 blocks, widths 16k, 32k, 64k),
    head bn1-relu (final pre-activation), avgpool, fc."""

    stage_names = ("block1", "block2", "block3")
    stem_module = "conv1"

    def __init__(self, depth: int, widen_factor: int, num_classes: int = 10, drop_rate: float = 0.0) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        ch = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, ch[0], 3, padding=1, bias=False)
        self.block1 = NetworkBlock(n, ch[0], ch[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, ch[1], ch[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, ch[2], ch[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(ch[3], num_classes)
        self.num_features = ch[3]
        self._set_feature_info(ch[0], ch[1:], (1, 1, 2, 4))
        _init_weights(self, linear_std=None)
        nn.init.zeros_(self.fc.bias)

    def forward_stem(self, x: Tensor) -> Tensor:
        return self.conv1(x)

    def forward_head(self, f: Tensor, pre_logits: bool = False) -> Tensor:
        f = torch.flatten(self.avgpool(self.relu(self.bn1(f))), 1)
        return f if pre_logits else self.fc(f)


# ---------------------------------------------------------------- VGG (RepDistiller, with BN)


def _vgg_block(cfg: list[int], cin: int, batch_norm: bool, last_relu: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for v in cfg:
        layers.append(nn.Conv2d(cin, v, 3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(v))
        layers.append(nn.ReLU(inplace=True))
        cin = v
    return nn.Sequential(*(layers if last_relu else layers[:-1]))


class CifarVGG(StagedNet):
    """RepDistiller VGG: stages block0..4 (3x3 convs with bias, BN, ReLU); after a stage: ReLU, then
    max-pool after stages 0-2, after stage 3 only when its map is >= 8 px (RepDistiller: input 64),
    none after stage 4. Head: adaptive avgpool + Linear(512, C)."""

    stage_names = ("block0", "block1", "block2", "block3", "block4")

    def __init__(self, cfg: list[list[int]], batch_norm: bool = True, num_classes: int = 10) -> None:
        super().__init__()
        cin = 3
        for i, c in enumerate(cfg):
            setattr(self, f"block{i}", _vgg_block(c, cin, batch_norm, last_relu=False))
            cin = c[-1]
        self.pool = nn.MaxPool2d(2, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cin, num_classes)
        self.num_features = cin
        self._set_feature_info(None, [c[-1] for c in cfg], (2, 4, 8, 8, 8))  # at 32 px: no pool after block3
        _init_weights(self, linear_std=0.01)

    def forward_stage(self, i: int, x: Tensor) -> Tensor:
        x = F.relu(getattr(self, self.stage_names[i])(x))
        if i < 3 or (i == 3 and x.shape[-2] >= 8):
            x = self.pool(x)
        return x

    def forward_head(self, f: Tensor, pre_logits: bool = False) -> Tensor:
        f = torch.flatten(self.avgpool(f), 1)
        return f if pre_logits else self.classifier(f)


# ---------------------------------------------------------------- NetGraft VGG16 (no BN)


class NetGraftVGG(StagedNet):
    """NetGraft `network/vgg_block.py` VGG: stages block0..4, each = (conv3x3 + ReLU) x k + MaxPool2;
    head = adaptive avgpool (identity on the 1x1 map of a 32x32 input), flatten, ``classifier``.
    Teacher classifier: Linear(512,512) -> BatchNorm1d(512) -> Linear(512,C); the thin student
    uses Linear(w,512) -> Linear(512,C). No ReLU in either classifier."""

    stage_names = ("block0", "block1", "block2", "block3", "block4")

    def __init__(self, cfg: list[list[int]], num_classes: int = 10, classifier_bn: bool = True) -> None:
        super().__init__()
        cin = 3
        for i, c in enumerate(cfg):
            block = _vgg_block(c, cin, batch_norm=False, last_relu=True)
            block.append(nn.MaxPool2d(2, 2))
            setattr(self, f"block{i}", block)
            cin = c[-1]
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        mid: list[nn.Module] = [nn.BatchNorm1d(512)] if classifier_bn else []
        self.classifier = nn.Sequential(nn.Linear(cin, 512), *mid, nn.Linear(512, num_classes))
        self.num_features = cin
        self._set_feature_info(None, [c[-1] for c in cfg], (2, 4, 8, 16, 32))
        _init_weights(self, linear_std=0.01)

    def forward_head(self, f: Tensor, pre_logits: bool = False) -> Tensor:
        f = torch.flatten(self.avgpool(f), 1)
        return f if pre_logits else self.classifier(f)


# ---------------------------------------------------------------- registry

_RESNETS = {
    "resnet8": (8, (16, 16, 32, 64)),
    "resnet20": (20, (16, 16, 32, 64)),
    "resnet32": (32, (16, 16, 32, 64)),
    "resnet56": (56, (16, 16, 32, 64)),
    "resnet110": (110, (16, 16, 32, 64)),
    "resnet8x4": (8, (32, 64, 128, 256)),
    "resnet32x4": (32, (32, 64, 128, 256)),
}
_WRNS = {"wrn_16_2": (16, 2), "wrn_40_1": (40, 1), "wrn_40_2": (40, 2)}
_VGG_CFGS = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
}
VGG16_CFG = [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]]
VGG16_GRAFT_CFG = [[64, 64], [128, 128], [256, 256, 256], [256, 256, 256], [256, 256, 256]]


def _register_resnet(name: str, depth: int, widths: tuple[int, int, int, int]) -> None:
    def build(num_classes: int = 10, **kwargs: object) -> nn.Module:
        return CifarResNet(depth, widths, num_classes=num_classes, **kwargs)  # type: ignore[arg-type]

    build.__doc__ = f"CIFAR ResNet-{depth}, widths {widths} (RepDistiller `{name}`)."
    MODELS.register(name)(build)


def _register_wrn(name: str, depth: int, k: int) -> None:
    def build(num_classes: int = 10, **kwargs: object) -> nn.Module:
        return WideResNet(depth, k, num_classes=num_classes, **kwargs)  # type: ignore[arg-type]

    build.__doc__ = f"WRN-{depth}-{k} (RepDistiller `{name}`); kwargs: drop_rate."
    MODELS.register(name)(build)


def _register_vgg(name: str, cfg: list[list[int]]) -> None:
    def build(num_classes: int = 10, **kwargs: object) -> nn.Module:
        return CifarVGG(cfg, batch_norm=True, num_classes=num_classes, **kwargs)  # type: ignore[arg-type]

    build.__doc__ = f"VGG with BN, blocks {cfg} (RepDistiller `{name}`)."
    MODELS.register(name)(build)


for _name, (_d, _w) in _RESNETS.items():
    _register_resnet(_name, _d, _w)
for _name, (_d, _k) in _WRNS.items():
    _register_wrn(_name, _d, _k)
for _name, _cfg in _VGG_CFGS.items():
    _register_vgg(_name, _cfg)


@MODELS.register("vgg16")
def vgg16(num_classes: int = 10, **kwargs: object) -> nn.Module:
    """NetGraft teacher: VGG16 without BN in the convs, classifier Linear-BN1d-Linear."""
    return NetGraftVGG(VGG16_CFG, num_classes=num_classes, classifier_bn=True, **kwargs)  # type: ignore[arg-type]


@MODELS.register("vgg16_graft")
def vgg16_graft(num_classes: int = 10, **kwargs: object) -> nn.Module:
    """NetGraft student: blocks 0-2 as vgg16, blocks 3-4 thinned to 256 channels, classifier
    Linear(256,512) -> Linear(512,C)."""
    return NetGraftVGG(VGG16_GRAFT_CFG, num_classes=num_classes, classifier_bn=False, **kwargs)  # type: ignore[arg-type]


def count_params(model: nn.Module | Sequence[nn.Module]) -> int:
    """Number of parameters of a network or of several together (trainable or not; buffers excluded;
    a tensor shared between networks counted once)."""
    models = nn.ModuleList([model] if isinstance(model, nn.Module) else list(model))
    return sum(p.numel() for p in models.parameters())

