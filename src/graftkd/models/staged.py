"""Stage views of networks (``stem -> stages[0..n) -> head``), 1x1 bridges, and folding them away.

A :class:`StagedModel` is a view: it holds a reference to the network and calls its own modules,
so nothing is copied. Supported: our CIFAR family (``graftkd.models.cifar``: ResNet, WRN, VGG,
NetGraft VGG16) and timm's ResNet family (``conv1, bn1, act1, maxpool / layer1..4 / global_pool,
fc``). Grafting (``graftkd.methods.graft``) needs a host and a student whose stage count and
boundary spatial sizes agree (:func:`check_compatible`); channel widths may differ and are bridged
by 1x1 convs (:func:`make_bridge`).

After grafting, consecutive ``s2t_i`` and ``t2s_{i+1}`` compose exactly into one square 1x1 conv
(:func:`compose_1x1`). Before a head that is global-average-pool -> Linear the conv commutes with
the pooling and folds exactly into the Linear (:func:`fold_into_linear`); elsewhere (between two
stages, or before WRN's BN-ReLU head) it stays as a single 1x1 conv, a *junction*. A student with
junctions is a :class:`GraftedStudent`: the student network plus one square 1x1 conv slot after
every stage boundary where one can occur (identity where the host needed none), registered as
``graft:<student>`` in ``MODELS`` so ``create_model``/``load_model_file`` rebuild it by name.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor, nn

from graftkd.errors import UserError
from graftkd.models.cifar import MODELS, CifarResNet, CifarVGG, NetGraftVGG, WideResNet

GRAFT_PREFIX = "graft:"
#: timm ResNet-family students that can be exported with junctions (``graft:<name>``)
TIMM_GRAFT_STUDENTS = ("resnet18", "resnet26", "resnet34", "resnet50", "resnet101", "resnet152")

# class -> (head module names, dotted name of the Linear that directly follows global average pooling
# or None when something non-linear sits between the last stage and the classifier)
_OUR_HEADS: dict[type, tuple[tuple[str, ...], str | None]] = {
    CifarResNet: (("avgpool", "fc"), "fc"),
    WideResNet: (("bn1", "relu", "avgpool", "fc"), None),
    CifarVGG: (("avgpool", "classifier"), "classifier"),
    NetGraftVGG: (("avgpool", "classifier"), "classifier.0"),
}


def _is_timm_resnet(model: nn.Module) -> bool:
    from timm.models.resnet import ResNet

    return isinstance(model, ResNet)


class StagedModel:
    """A view of ``model`` as ``stem -> stages -> head`` sharing its modules (no weights copied)."""

    def __init__(self, model: nn.Module, label: str = "model") -> None:
        self.model, self.label = model, label
        if type(model) in _OUR_HEADS:
            self.stage_names: tuple[str, ...] = tuple(model.stage_names)
            self.head_names, self.head_linear = _OUR_HEADS[type(model)]
            self._ours = True
        elif _is_timm_resnet(model):
            self.stage_names = ("layer1", "layer2", "layer3", "layer4")
            pool = getattr(model.global_pool, "pool_type", "")
            self.head_names = ("global_pool", "fc")
            self.head_linear = "fc" if pool == "avg" and isinstance(model.fc, nn.Linear) else None
            self._ours = False
        else:
            raise UserError(f"{label}: {type(model).__name__} has no stage view; grafting supports our CIFAR "
                            f"ResNets/WRNs/VGGs and timm ResNet-family models")
        taken = set(self.stage_names) | set(self.head_names)
        self.stem_names = tuple(n for n, _ in model.named_children() if n not in taken)

    @property
    def n_stages(self) -> int:
        return len(self.stage_names)

    def stem(self, x: Tensor) -> Tensor:
        if self._ours:
            return self.model.forward_stem(x)
        m = self.model
        return m.maxpool(m.act1(m.bn1(m.conv1(x))))

    def stage(self, i: int, x: Tensor) -> Tensor:
        """Stage i including its parameter-free glue (VGG's ReLU + max-pool)."""
        if self._ours:
            return self.model.forward_stage(i, x)
        return getattr(self.model, self.stage_names[i])(x)

    def head(self, f: Tensor) -> Tensor:
        return self.model.forward_head(f)

    def features(self, x: Tensor, stages: int | None = None) -> Tensor:
        """The stem and the first ``stages`` stages (all of them by default: the head's input)."""
        x = self.stem(x)
        for i in range(self.n_stages if stages is None else stages):
            x = self.stage(i, x)
        return x

    def __call__(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    def stage_module(self, i: int) -> nn.Module:
        return getattr(self.model, self.stage_names[i])

    def named_stem(self) -> Iterator[tuple[str, nn.Module]]:
        return ((n, getattr(self.model, n)) for n in self.stem_names)

    def named_head(self) -> Iterator[tuple[str, nn.Module]]:
        return ((n, getattr(self.model, n)) for n in self.head_names)

    def head_linear_module(self) -> nn.Linear | None:
        return None if self.head_linear is None else self.model.get_submodule(self.head_linear)

    @torch.no_grad()
    def boundary_shapes(self, input_size: int) -> list[tuple[int, int, int]]:
        """(C, H, W) after the stem and after each stage, from one dummy forward in eval mode."""
        was_training = self.model.training
        self.model.eval()
        try:
            p = next(self.model.parameters())
            x = self.stem(torch.zeros(1, 3, input_size, input_size, device=p.device, dtype=p.dtype))
            shapes = [tuple(x.shape[1:])]
            for i in range(self.n_stages):
                x = self.stage(i, x)
                shapes.append(tuple(x.shape[1:]))
        finally:
            self.model.train(was_training)
        return shapes  # type: ignore[return-value]


def boundary_name(view: StagedModel, b: int) -> str:
    """Boundary b = output of the stem (b = 0) or of stage b-1."""
    return "stem" if b == 0 else f"stage {b - 1} ({view.stage_names[b - 1]})"


def check_compatible(teacher: StagedModel, student: StagedModel,
                     input_size: int) -> list[tuple[tuple[int, int, int], tuple[int, int, int]]]:
    """(teacher, student) (C, H, W) at every boundary; UserError when the stage counts or a boundary's
    spatial size differ, naming the stage and both shapes."""
    if teacher.n_stages != student.n_stages:
        raise UserError(f"grafting needs the same number of stages: {teacher.label} has {teacher.n_stages} "
                        f"{teacher.stage_names}, {student.label} has {student.n_stages} {student.stage_names}")
    pairs = list(zip(teacher.boundary_shapes(input_size), student.boundary_shapes(input_size)))
    for b, (t, s) in enumerate(pairs):
        if t[1:] != s[1:]:
            raise UserError(f"grafting needs equal spatial sizes at every stage boundary; at {input_size} px the "
                            f"output of {boundary_name(teacher, b)} is {t} (C, H, W) in {teacher.label} but "
                            f"{s} in {student.label}")
    return pairs


# ------------------------------------------------------------------------------------- bridges
def make_bridge(cin: int, cout: int) -> nn.Conv2d:
    """1x1 conv with bias, initialised to the truncated identity ``W = I[:cout, :cin]``, ``b = 0``:
    the identity when square; a pair t2s = I[:s, :t], s2t = I[:t, :s] composes to the identity."""
    conv = nn.Conv2d(cin, cout, 1, bias=True)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(cout, cin).view(cout, cin, 1, 1))
        conv.bias.zero_()
    return conv


@torch.no_grad()
def compose_1x1(first: nn.Conv2d, second: nn.Conv2d) -> nn.Conv2d:
    """One 1x1 conv equal to ``second(first(x))``: ``W = W2 W1``, ``b = W2 b1 + b2`` (float64 product)."""
    w1, w2 = first.weight.double().flatten(1), second.weight.double().flatten(1)
    b1 = first.bias.double() if first.bias is not None else torch.zeros(w1.shape[0], dtype=torch.float64,
                                                                          device=w1.device)
    b2 = second.bias.double() if second.bias is not None else 0.0
    out = nn.Conv2d(w1.shape[1], w2.shape[0], 1, bias=True).to(device=first.weight.device, dtype=first.weight.dtype)
    out.weight.copy_((w2 @ w1).view_as(out.weight))
    out.bias.copy_(w2 @ b1 + b2)
    return out


@torch.no_grad()
def fold_into_linear(conv: nn.Conv2d, linear: nn.Linear) -> None:
    """In place: ``linear(pool(conv(x))) == linear'(pool(x))`` for global average pooling, since a
    1x1 conv is per-position affine: ``A' = A W``, ``c' = A b + c``."""
    if linear.bias is None:
        raise UserError("cannot fold a bridge into a Linear without bias")
    w, b = conv.weight.double().flatten(1), conv.bias.double()
    a, c = linear.weight.double(), linear.bias.double()
    weight, bias = a @ w, a @ b + c  # both before writing: .double() aliases a float64 layer
    linear.weight.copy_(weight)
    linear.bias.copy_(bias)


# ---------------------------------------------------------------------------- exported student
def junction_slots(view: StagedModel) -> list[int]:
    """Stage indices i after which a junction can remain: every stage but the last, and the last one
    too when the head does not start with global-average-pool -> Linear."""
    last = view.n_stages - 1
    return list(range(last)) + ([] if view.head_linear is not None else [last])


class GraftedStudent(nn.Module):
    """A grafted student whose folded bridges could not be absorbed: ``net`` (the student
    architecture) with a square 1x1 conv ``junctions[str(i)]`` after stage i for every slot of
    :func:`junction_slots` (identity where the host needed no bridge)."""

    def __init__(self, net: nn.Module, input_size: int = 64) -> None:
        super().__init__()
        self.net = net
        view = StagedModel(net, "student")
        widths = [s[0] for s in view.boundary_shapes(input_size)[1:]]
        self.junctions = nn.ModuleDict({str(i): make_bridge(widths[i], widths[i]) for i in junction_slots(view)})

    def forward(self, x: Tensor) -> Tensor:
        view = StagedModel(self.net, "student")
        x = view.stem(x)
        for i in range(view.n_stages):
            x = view.stage(i, x)
            if str(i) in self.junctions:
                x = self.junctions[str(i)](x)
        return view.head(x)


def _register_grafted(student: str) -> None:
    def build(num_classes: int = 10, **kwargs: object) -> nn.Module:
        from graftkd.models.factory import create_model

        return GraftedStudent(create_model(student, num_classes=num_classes, **kwargs))

    build.__doc__ = f"Grafted `{student}` with a square 1x1 junction after each stage boundary."
    MODELS.register(GRAFT_PREFIX + student)(build)


for _name in [n for n in MODELS.names() if not n.startswith(GRAFT_PREFIX)] + list(TIMM_GRAFT_STUDENTS):
    _register_grafted(_name)
