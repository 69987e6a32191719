"""The stage view of a network (``segments -> head``), 1x1 bridges, and folding them away.

One feature contract for every network graftkd builds: a :class:`StagedModel` cuts a network at
the boundaries its ``feature_info`` names (timm's contract, which our CIFAR family implements
too): segment i ends at boundary i, whose width (``num_chs``) and ``reduction`` feature_info
gives; the head is everything after the last boundary (timm: the rest of ``forward_features``,
then ``forward_head``). The view holds the network and calls its own modules: nothing is copied.

- Our CIFAR family (``graftkd.models.cifar.StagedNet``): segments are the stem (when the network
  has one) and the stages, run by the network's ``forward_stem``/``forward_stage``.
- A timm CNN: its modules in registration order (containers of a named module expanded), cut after
  each feature_info module. Which modules ``forward_features`` runs is traced once with hooks, and
  the view is checked against the network's own forward on a dummy batch; a network the view does
  not reproduce (or without named feature_info) is a one-line error listing the families that work.

Folding (grafting's export): a square 1x1 map M at boundary b (two bridges composed,
:func:`compose_1x1`) is absorbed exactly by what consumes boundary b (:meth:`StagedModel.consumer`):

- the first conv(s) of the next segment's first block, when every path out of the boundary starts
  with a conv (groups 1): a plain conv (VGG), ``conv1`` + the projection shortcut of a ResNet/RegNet
  block (an average pool in front of the shortcut conv commutes), ``conv_pw``/``conv_exp`` of an
  EfficientNet/MobileNet block without skip; or a 1x1 conv right after global average pooling
  (MobileNetV3's ``conv_head``) or in the tail of ``forward_features`` (EfficientNet's ``conv_head``).
  W' = W M (:func:`fold_into_convs`); exact only for a bias-free M (a bias in front of a zero-padded
  conv changes the borders), so bridges at such boundaries have no bias;
- the classifier Linear right after global average pooling: A' = A M, c' = A b + c (bias allowed);
- nothing (an identity shortcut, a depthwise conv, a max-pool, a BN/LayerNorm before the conv):
  M stays as a square 1x1 conv, a *junction*. A student with junctions is a :class:`GraftedStudent`,
  rebuilt by ``create_model('graft:<student>')``: the student plus a 1x1 slot at every boundary
  without a consumer (identity where grafting needed none).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor, nn

from graftkd.errors import UserError
from graftkd.models.cifar import CifarResNet, CifarVGG, NetGraftVGG, StagedNet, WideResNet

GRAFT_PREFIX = "graft:"
VIEW_FAMILIES = ("our CIFAR ResNet/WRN/VGG", "timm ResNet/ResNet-D", "RegNet", "EfficientNet", "MobileNetV3",
                 "ConvNeXt", "DenseNet")
TRACE_SIZE = 64  # px of the dummy batch that traces a timm network (its reductions go up to 32)

# our family: head module names, and the Linear right after global average pooling (None: a BN-ReLU first)
_OUR_HEADS: dict[type, tuple[tuple[str, ...], str | None]] = {
    CifarResNet: (("avgpool", "fc"), "fc"),
    WideResNet: (("bn1", "relu", "avgpool", "fc"), None),
    CifarVGG: (("avgpool", "classifier"), "classifier"),
    NetGraftVGG: (("avgpool", "classifier"), "classifier.0"),
}


@dataclass
class Segment:
    """Modules from the previous boundary up to boundary ``index`` (its output)."""

    name: str
    modules: tuple[tuple[str, nn.Module], ...]
    channels: int
    reduction: int


@dataclass
class Consumer:
    """What absorbs a 1x1 map at a boundary: ``convs`` (bias-free map only) or a ``linear`` after pooling."""

    convs: tuple[nn.Conv2d, ...] = ()
    linear: nn.Linear | None = None

    @property
    def takes_bias(self) -> bool:
        return self.linear is not None


def _cannot_view(label: str, model: nn.Module, why: str) -> UserError:
    return UserError(f"{label}: {type(model).__name__} has no stage view ({why}); graftkd views "
                     f"{', '.join(VIEW_FAMILIES)} (timm CNNs whose feature_info names their modules)")


class StagedModel:
    """A view of ``model`` as ``segments -> head`` sharing its modules (no weights copied)."""

    def __init__(self, model: nn.Module, label: str = "model") -> None:
        self.model, self.label = model, label
        if isinstance(model, StagedNet):
            self._init_ours()
        else:
            self._init_timm()

    # ------------------------------------------------------------------------------- building
    def _init_ours(self) -> None:
        m = self.model
        if type(m) not in _OUR_HEADS:
            raise _cannot_view(self.label, m, "no head is declared for it")
        self._ours = True
        self.head_names, head_linear = _OUR_HEADS[type(m)]
        taken = set(m.stage_names) | set(self.head_names)
        stem = tuple((n, c) for n, c in m.named_children() if n not in taken)
        info = m.feature_info
        segs = [(n, ((n, getattr(m, n)),)) for n in m.stage_names]
        if m.stem_module:
            segs.insert(0, ("stem", stem))
        self.segments = [Segment(n, mods, int(f["num_chs"]), int(f["reduction"])) for (n, mods), f in zip(segs, info)]
        self.head_modules = tuple((n, getattr(m, n)) for n in self.head_names)
        self._tail: tuple[nn.Module, ...] = ()
        self._head_consumer = Consumer(linear=m.get_submodule(head_linear)) if head_linear else None

    def _init_timm(self) -> None:
        m = self.model
        info = getattr(m, "feature_info", None)
        if not isinstance(info, list) or not info or not all(isinstance(f, dict) and f.get("module") for f in info):
            raise _cannot_view(self.label, m, "no feature_info naming its modules")
        if not hasattr(m, "forward_features") or not hasattr(m, "forward_head"):
            raise _cannot_view(self.label, m, "no forward_features/forward_head")
        self._ours = False
        names = [str(f["module"]) for f in info]
        flat: list[tuple[str, nn.Module]] = []

        def expand(prefix: str, module: nn.Module) -> None:
            for n, child in module.named_children():
                full = prefix + n
                if any(f.startswith(full + ".") for f in names):
                    expand(full + ".", child)
                else:
                    flat.append((full, child))

        expand("", m)
        index = {n: i for i, (n, _) in enumerate(flat)}
        missing = [n for n in names if n not in index]
        if missing:
            raise _cannot_view(self.label, m, f"feature_info module '{missing[0]}' is not a cut point")
        called = self._trace(flat)
        if called != sorted(called):
            raise _cannot_view(self.label, m, "forward_features does not run its modules in order")
        cuts = [index[n] for n in names]
        if cuts != sorted(cuts) or any(c not in called for c in cuts):
            raise _cannot_view(self.label, m, "feature_info modules out of order or unused")
        self.segments, start = [], 0
        for f, cut in zip(info, cuts):
            mods = tuple(flat[i] for i in called if start <= i <= cut)
            self.segments.append(Segment(str(f["module"]), mods, int(f["num_chs"]), int(f["reduction"])))
            start = cut + 1
        self._tail = tuple(flat[i][1] for i in called if i >= start)
        self.head_modules = tuple(flat[i] for i in range(start, len(flat)))  # tail + what forward_head runs
        self.head_names = tuple(n for n, _ in self.head_modules)
        self._head_consumer = self._timm_head_consumer(flat, called, start)
        self._check_equals_forward()

    @torch.no_grad()
    def _trace(self, flat: list[tuple[str, nn.Module]]) -> list[int]:
        """Indices into ``flat`` of the modules ``forward_features`` runs, in call order."""
        order: list[int] = []
        hooks = [mod.register_forward_hook(lambda *_, i=i: order.append(i) if i not in order else None)
                 for i, (_, mod) in enumerate(flat)]
        try:
            with _eval(self.model):
                self.model.forward_features(self._dummy())
        finally:
            for h in hooks:
                h.remove()
        return order

    def _dummy(self) -> Tensor:
        p = next(self.model.parameters())
        g = torch.Generator().manual_seed(0)
        return torch.randn(2, 3, TRACE_SIZE, TRACE_SIZE, generator=g).to(device=p.device, dtype=p.dtype)

    @torch.no_grad()
    def _check_equals_forward(self) -> None:
        with _eval(self.model):
            x = self._dummy()
            ref, got = self.model(x), self(x)
        if ref.shape != got.shape or not torch.allclose(ref, got, rtol=1e-4, atol=1e-5 * (1 + float(ref.abs().max()))):
            raise _cannot_view(self.label, self.model, "running its modules in order does not reproduce its forward")

    def _timm_head_consumer(self, flat: list[tuple[str, nn.Module]], called: list[int], start: int) -> Consumer | None:
        tail = [mod for mod in self._tail if not isinstance(mod, nn.Identity)]
        if tail:
            convs = _input_convs(tail[0])
            return Consumer(convs=convs) if convs and all(c.kernel_size == (1, 1) for c in convs) else None
        m = self.model
        head = getattr(m, "head", None)
        pool = getattr(m, "global_pool", None) or getattr(head, "global_pool", None)
        if getattr(pool, "pool_type", None) != "avg":
            return None
        after = [mod for i, (_, mod) in enumerate(flat) if i >= start and i not in called]
        if not isinstance(getattr(m, "conv_head", None), nn.Conv2d) or m.conv_head not in after:
            norm = getattr(head, "norm", None)
            if norm is not None and not isinstance(norm, nn.Identity):
                return None  # LayerNorm after pooling (ConvNeXt)
            clf = m.get_classifier() if hasattr(m, "get_classifier") else None
            return Consumer(linear=clf) if isinstance(clf, nn.Linear) else None
        return Consumer(convs=(m.conv_head,))  # MobileNetV3: pool -> 1x1 conv_head

    # ------------------------------------------------------------------------------- running
    @property
    def n_stages(self) -> int:
        """Number of segments (boundaries)."""
        return len(self.segments)

    @property
    def stage_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.segments)

    @property
    def channels(self) -> list[int]:
        return [s.channels for s in self.segments]

    def stage(self, i: int, x: Tensor) -> Tensor:
        """Segment i (including its parameter-free glue, e.g. VGG's ReLU + max-pool)."""
        if self._ours:
            has_stem = bool(self.model.stem_module)
            if has_stem and i == 0:
                return self.model.forward_stem(x)
            return self.model.forward_stage(i - has_stem, x)
        for _, mod in self.segments[i].modules:
            x = mod(x)
        return x

    def head(self, f: Tensor) -> Tensor:
        for mod in self._tail:
            f = mod(f)
        return self.model.forward_head(f)

    def head_input(self, f: Tensor) -> Tensor:
        """The map ``forward_head`` gets (after the tail of ``forward_features``, e.g. EfficientNet's conv_head)."""
        for mod in self._tail:
            f = mod(f)
        return f

    def pre_logits(self, f: Tensor) -> Tensor:
        """The pooled features the classifier sees (timm's ``forward_head(pre_logits=True)``)."""
        for mod in self._tail:
            f = mod(f)
        return self.model.forward_head(f, pre_logits=True)

    def features(self, x: Tensor, stages: int | None = None) -> Tensor:
        """The first ``stages`` segments (all of them by default: the head's input)."""
        for i in range(self.n_stages if stages is None else stages):
            x = self.stage(i, x)
        return x

    def intermediates(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        """Every boundary's map and the logits, in one forward."""
        maps = []
        for i in range(self.n_stages):
            x = self.stage(i, x)
            maps.append(x)
        return maps, self.head(x)

    def __call__(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    def stage_modules(self, i: int) -> list[nn.Module]:
        return [mod for _, mod in self.segments[i].modules]

    def named_head(self) -> Iterator[tuple[str, nn.Module]]:
        return iter(self.head_modules)

    def consumer(self, b: int) -> Consumer | None:
        """What absorbs a 1x1 map at boundary b exactly (module docstring), None: a junction stays."""
        if b == self.n_stages - 1:
            return self._head_consumer
        first = self.segments[b + 1].modules[0][1] if self.segments[b + 1].modules else None
        convs = _input_convs(first) if first is not None else ()
        return Consumer(convs=convs) if convs else None

    @torch.no_grad()
    def boundary_shapes(self, input_size: int) -> list[tuple[int, int, int]]:
        """(C, H, W) at every boundary, from one dummy forward in eval mode."""
        p = next(self.model.parameters())
        x = torch.zeros(1, 3, input_size, input_size, device=p.device, dtype=p.dtype)
        shapes = []
        with _eval(self.model):
            for i in range(self.n_stages):
                x = self.stage(i, x)
                shapes.append(tuple(x.shape[1:]))
        return shapes  # type: ignore[return-value]


class _eval:
    """Context: the module in eval mode, its training flag restored after."""

    def __init__(self, module: nn.Module) -> None:
        self.module, self.was = module, module.training

    def __enter__(self) -> None:
        self.module.eval()

    def __exit__(self, *_: object) -> None:
        self.module.train(self.was)


def _first_conv(module: nn.Module) -> nn.Conv2d | None:
    """The conv a projection shortcut starts with; only average pooling (which commutes with a 1x1
    map) may come before it."""
    if isinstance(module, nn.Conv2d):
        return module
    for child in module.children():
        if isinstance(child, nn.Conv2d):
            return child
        if isinstance(child, (nn.AvgPool2d, nn.Identity)):
            continue
        return _first_conv(child) if len(list(child.children())) else None
    return None


def _input_convs(module: nn.Module) -> tuple[nn.Conv2d, ...]:
    """The convs (groups 1) that every path from the input of ``module`` starts with; () when some
    path does not (identity shortcut, depthwise conv, norm or pooling first, unknown block)."""
    while (isinstance(module, nn.Sequential) or type(module).__name__.endswith("Stage")) and len(list(module.children())):
        module = next(module.children())  # a stage runs its children in order (timm RegStage, ConvNeXtStage)
    if isinstance(module, nn.Conv2d):
        return (module,) if module.groups == 1 else ()
    if hasattr(module, "conv1") and hasattr(module, "downsample"):  # ResNet / RegNet block, our BasicBlock
        if module.downsample is None:
            return ()
        convs = (_first_conv(module.conv1), _first_conv(module.downsample))
        return convs if all(c is not None and c.groups == 1 for c in convs) else ()  # type: ignore[return-value]
    if hasattr(module, "has_skip"):  # timm EfficientNet / MobileNet blocks
        if module.has_skip:
            return ()
        for child in module.children():
            if isinstance(child, nn.Conv2d):
                return (child,) if child.groups == 1 else ()
    return ()


# ------------------------------------------------------------------------------------- bridges
def make_bridge(cin: int, cout: int, bias: bool = True) -> nn.Conv2d:
    """1x1 conv initialised to the truncated identity ``W = I[:cout, :cin]`` (``b = 0``): the identity
    when square; a pair t2s = I[:s, :t], s2t = I[:t, :s] composes to the identity."""
    conv = nn.Conv2d(cin, cout, 1, bias=bias)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(cout, cin).view(cout, cin, 1, 1))
        if bias:
            conv.bias.zero_()
    return conv


@torch.no_grad()
def compose_1x1(first: nn.Conv2d, second: nn.Conv2d) -> nn.Conv2d:
    """One 1x1 conv equal to ``second(first(x))``: ``W = W2 W1``, ``b = W2 b1 + b2`` (float64 product);
    bias-free when both are."""
    w1, w2 = first.weight.double().flatten(1), second.weight.double().flatten(1)
    bias = first.bias is not None or second.bias is not None
    out = nn.Conv2d(w1.shape[1], w2.shape[0], 1, bias=bias).to(device=first.weight.device, dtype=first.weight.dtype)
    out.weight.copy_((w2 @ w1).view_as(out.weight))
    if bias:
        b1 = first.bias.double() if first.bias is not None else torch.zeros(w1.shape[0], dtype=torch.float64,
                                                                              device=w1.device)
        b2 = second.bias.double() if second.bias is not None else 0.0
        out.bias.copy_(w2 @ b1 + b2)
    return out


@torch.no_grad()
def fold_into_linear(conv: nn.Conv2d, linear: nn.Linear) -> None:
    """In place: ``linear(pool(conv(x))) == linear'(pool(x))`` for global average pooling, since a
    1x1 conv is per-position affine: ``A' = A W``, ``c' = A b + c``."""
    if linear.bias is None and conv.bias is not None:
        raise UserError("cannot fold a bridge with bias into a Linear without bias")
    w = conv.weight.double().flatten(1)
    a = linear.weight.double()
    weight = a @ w  # before writing: .double() aliases a float64 layer
    if conv.bias is not None:
        bias = a @ conv.bias.double() + linear.bias.double()
        linear.bias.copy_(bias)
    linear.weight.copy_(weight)


@torch.no_grad()
def fold_into_convs(conv: nn.Conv2d, targets: tuple[nn.Conv2d, ...]) -> None:
    """In place: every target ``c(conv(x)) == c'(x)`` for a bias-free 1x1 ``conv``: ``W'[o, s] = sum_i
    W[o, i] M[i, s]`` at every kernel position (exact at zero-padded borders since M has no bias)."""
    if conv.bias is not None and bool(conv.bias.any()):
        raise ValueError("a 1x1 map with bias does not fold exactly into a padded conv")
    m = conv.weight.double().flatten(1)
    for c in targets:
        w = torch.einsum("oihw,is->oshw", c.weight.double(), m)
        c.weight.copy_(w)


# ---------------------------------------------------------------------------- exported student
def junction_slots(view: StagedModel) -> list[int]:
    """Boundaries of ``view`` where a 1x1 junction can remain: those without a :meth:`consumer`."""
    return [b for b in range(view.n_stages) if view.consumer(b) is None]


class GraftedStudent(nn.Module):
    """A grafted student whose folded bridges could not all be absorbed: ``net`` (the student
    architecture) with a square 1x1 conv ``junctions[str(b)]`` after every boundary b of
    :func:`junction_slots` (identity where the host needed no bridge)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        view = StagedModel(net, "student")
        self.junctions = nn.ModuleDict({str(b): make_bridge(view.channels[b], view.channels[b])
                                        for b in junction_slots(view)})
        self._view = view

    def forward(self, x: Tensor) -> Tensor:
        view = self._view
        for b in range(view.n_stages):
            x = view.stage(b, x)
            if str(b) in self.junctions:
                x = self.junctions[str(b)](x)
        return view.head(x)
