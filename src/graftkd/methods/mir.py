"""MiR, "mimicking then replacing" (Wang et al., CVPR 2022): few-sample compression by making the
student mimic the teacher's features right before its head, then putting the teacher's head on
the student.

- ``level: pre_pool`` (MiR's): the map before global pooling; used when both networks' heads are
  global average pooling -> classifier (ResNets, RegNets, EfficientNets, DenseNets, our CIFAR
  ResNets/VGGs), checked numerically at set-up. ``pre_logits``: the pooled features the classifier
  sees (MobileNetV3, ConvNeXt: their heads are not pool -> Linear). ``auto``: pre_pool when possible.
- A 1x1 projection P (student width -> teacher width, a Linear over channels) maps the student's
  features to the teacher's standardised ones, ``u_T = (f_T - mu) / s`` (``standardize``, default:
  ``mu`` the per-channel mean and ``s`` one scale, the root of the mean per-channel variance, both
  measured on the first training batch and then fixed; ``standardize: false``: ``mu = 0, s = 1``,
  MiR's plain MSE). ``loss = feat_weight * MSE(P f_S, u_T) + ce_weight * CE + kd_weight * T^2 KL``
  on the logits ``W_T (s P pool(f_S) + mu) + b_T`` (the teacher's classifier on the student's
  features in the teacher's units; no labels by default).
- Why standardise: the plain MSE ties the step size to the teacher's feature magnitude. A trained
  resnet10t's pooled post-ReLU features have a per-channel variance ~0.09 on 512 channels; on them
  a mobilenetv3_small_100 student from random initialisation stayed at chance after 80 SGD steps at
  lr 0.05 (12% on digits, benchmarks/results/fewshot_families.json at 2d98aae) while KD reached 64%.
- Export: s, mu, P and the teacher's classifier fold exactly into the student's own classifier
  Linear (``A = s W_T W_P``, ``c = W_T (s b_P + mu) + b_T``; pooling commutes with P), so the
  exported file is the plain student.
"""
from __future__ import annotations

import copy
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from graftkd.config import ExperimentConfig, MethodConfig
from graftkd.errors import UserError
from graftkd.methods.base import METHODS, Phase, StepContext, labelled_ce, single_phase
from graftkd.methods.features import FeatureMethod, chosen_teacher
from graftkd.models.staged import StagedModel
from graftkd.teachers.targets import build_teacher_targets


class MiRMethod(MethodConfig):
    """MiR: mimic one teacher's pre-pooling (or pre-logit) features, then use its classifier."""

    name: Literal["mir"] = "mir"
    teacher: int | None = Field(None, ge=0, description="index into `teachers` of the teacher to mimic; "
                                                        "None: the best on validation")
    level: Literal["auto", "pre_pool", "pre_logits"] = Field("auto", description="features mimicked (module doc)")
    feat_weight: float = Field(10.0, ge=0, description="weight of the feature MSE (standardised units)")
    standardize: bool = Field(True, description="regress the teacher's features standardised (per-channel mean, one "
                                                "scale; from the first batch), the head undoes it; false: plain MSE")
    ce_weight: float = Field(0.0, ge=0, description="weight of CE to the labels (MiR: 0, no labels)")
    kd_weight: float = Field(0.0, ge=0, description="weight of T^2 KL to the fused soft target")
    temperature: float = Field(4.0, gt=0, description="T of the KD term")


def classifier(view: StagedModel) -> nn.Linear:
    clf = view.model.get_classifier() if hasattr(view.model, "get_classifier") else None
    if not isinstance(clf, nn.Linear):
        raise UserError(f"method 'mir' needs a single Linear classifier on the pooled features; {view.label} has "
                        f"{type(clf).__name__}")
    return clf


@torch.no_grad()
def pools_then_classifies(view: StagedModel, size: int) -> bool:
    """Whether the head is global average pooling -> classifier (checked on a dummy map)."""
    p = next(view.model.parameters())
    c, h, w = view.boundary_shapes(size)[-1]
    f = torch.randn(2, c, h, w, generator=torch.Generator().manual_seed(0)).to(p)
    was = view.model.training
    view.model.eval()
    try:
        pooled, m = view.pre_logits(f).flatten(1), view.head_input(f).mean((2, 3))
        return pooled.shape == m.shape and torch.allclose(pooled, m, rtol=1e-4, atol=1e-5)
    finally:
        view.model.train(was)


class MiR(FeatureMethod):
    def __init__(self, cfg: ExperimentConfig, student: nn.Module, targets: Any, input_size: int, name: str,
                 teacher: int) -> None:
        super().__init__(cfg, student, targets, input_size, name)
        m = cfg.method
        assert isinstance(m, MiRMethod)
        self.m, self.k = m, teacher
        tv = self.T[teacher]
        self.t_clf = classifier(tv)
        self.s_clf = classifier(self.S)
        same_map = tv.boundary_shapes(input_size)[-1][1:] == self.S.boundary_shapes(input_size)[-1][1:]
        can_pool = same_map and pools_then_classifies(tv, input_size) and pools_then_classifies(self.S, input_size)
        if m.level == "pre_pool" and not can_pool:
            raise UserError(f"method.level = pre_pool: the heads of {tv.label} and {self.S.label} are not both global "
                            f"average pooling -> classifier on maps of one size; use pre_logits or auto")
        self.level = "pre_pool" if m.level == "pre_pool" or (m.level == "auto" and can_pool) else "pre_logits"
        self.proj = nn.Linear(self.s_clf.in_features, self.t_clf.in_features)
        self.register_buffer("t_shift", torch.zeros(self.t_clf.in_features))  # mu
        self.register_buffer("t_scale", torch.ones(()))  # s
        self.register_buffer("standardized", torch.tensor(False))
        self.s_clf.requires_grad_(False)  # replaced by the teacher's classifier; folded at export

    def phases(self) -> list[Phase]:
        own = {id(p) for p in self.s_clf.parameters()}
        return single_phase(self.cfg, [p for p in self.model.parameters() if id(p) not in own] +
                            list(self.proj.parameters()))

    def _features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The student's projected features (map or pooled, standardised units) and its logits through the
        teacher's classifier (in the teacher's units)."""
        f = self.S.features(x)
        if self.level == "pre_pool":
            m = F.conv2d(self.S.head_input(f), self.proj.weight[:, :, None, None], self.proj.bias)
            return m, self.t_clf(self.t_scale * m.mean((2, 3)) + self.t_shift)
        z = self.proj(self.S.pre_logits(f).flatten(1))
        return z, self.t_clf(self.t_scale * z + self.t_shift)

    @torch.no_grad()
    def _standardize_from(self, target: Tensor) -> None:
        """``mu`` and ``s`` from the first batch's teacher features (per channel over images and positions)."""
        dims = [0, *range(2, target.dim())]
        self.t_shift.copy_(target.mean(dims))
        self.t_scale.copy_(target.var(dims, correction=0).mean().sqrt().clamp_min(1e-6))
        self.standardized.fill_(True)

    def training_step(self, batch: dict[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        x, y = batch["image"], batch["label"]
        tv, t = self.T[self.k], self.targets.ensemble.teachers[self.k]
        with torch.no_grad():
            ft = tv.features(t.renormalised(x))
            target = tv.head_input(ft) if self.level == "pre_pool" else tv.pre_logits(ft).flatten(1)
        if self.m.standardize and not bool(self.standardized):
            self._standardize_from(target.float())  # before the student's logits read mu and s
        feats, logits = self._features(x)
        shape = (1, -1) + (1,) * (target.dim() - 2)
        mse = F.mse_loss(feats.float(), (target.float() - self.t_shift.view(shape)) / self.t_scale)
        out = {"mimic": mse}
        loss = self.m.feat_weight * mse
        if self.m.ce_weight > 0:
            out["ce"] = labelled_ce(logits.float(), y)
            loss = loss + self.m.ce_weight * out["ce"]
        return self.with_kd(out, loss, logits, y, self.m, lambda: self.targets(batch))

    def eval_logits(self, images: Tensor) -> Tensor:
        return self._features(images)[1]

    @torch.no_grad()
    def student(self) -> nn.Module:
        """The plain student with ``classifier = s W_T P``, bias ``W_T (s b_P + mu) + b_T`` (exact: pooling
        commutes with P)."""
        net = copy.deepcopy(self.model)
        clf = net.get_classifier()
        w_t, w_p, s = self.t_clf.weight.double(), self.proj.weight.double(), self.t_scale.double()
        clf.weight.copy_(s * w_t @ w_p)
        clf.bias.copy_(w_t @ (s * self.proj.bias.double() + self.t_shift.double()) + self.t_clf.bias.double())
        return net

    def final_metrics(self, score: Any) -> dict[str, Any]:
        report = super().final_metrics(score)
        report["mir"] = {"teacher": self.k, "level": self.level,
                         "projection": [self.proj.in_features, self.proj.out_features],
                         "teacher_scale": float(self.t_scale)}
        return report


@METHODS.register("mir", config=MiRMethod)
def build_mir(cfg: ExperimentConfig, data: Any, build_student: Any, run_dir: Any, device: torch.device,
              dist: Any, **_: Any) -> MiR:
    m = cfg.method
    assert isinstance(m, MiRMethod)
    targets = build_teacher_targets(cfg, data, run_dir, device, dist, m.temperature, False)
    teacher = chosen_teacher(m.teacher, targets)
    return MiR(cfg, build_student().to(device), targets, data.image_size, cfg.model.name, teacher)
