"""FSKD, few-sample KD (Li et al., CVPR 2020): 1x1 alignment convs after the student's blocks,
fitted on a few samples to the teacher's block outputs, then merged into the student's own layers.

FSKD's student is a pruned copy of its teacher, so both block outputs live in one channel basis and
``Q`` is fitted so that ``Q X_S ~ X_T``. For any pair of the feature contract graftkd first brings
the teacher's map into the student's basis with a least-squares map ``B`` (``teacher_map:
least_squares``, ``B = argmin ||B Y_T - X_S||^2 + ridge ||B||^2`` on the first alignment batch;
``identity`` is FSKD's own setting and needs equal widths), so the target is the part of the
student's features a linear map of the teacher's explains.

- Phase ``train`` (1 - ``align_share`` of the run): ``ce_weight * CE + kd_weight * T^2 KL`` to the
  fused soft target (the KD baseline).
- Phase ``align`` (the rest): only the square, bias-free, identity-initialised ``Q_b`` train, at
  every boundary b the teacher shares with the student whose consumer can absorb a 1x1 map
  (``StagedModel.consumer``), on ``sum_b MSE(Q_b X_b, B_b Y_b) + kd_weight * T^2 KL``.
- Export: every ``Q_b`` folds exactly into the student's next convs or classifier (the paper merges
  it into the previous conv; where the block ends in BN/ReLU/a residual sum only the next layer can
  take it): the exported file is the plain student.
"""
from __future__ import annotations

import copy
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from graftkd.config import ExperimentConfig, MethodConfig, OptimizerConfig, ScheduleConfig
from graftkd.errors import UserError
from graftkd.methods.base import METHODS, OptimSpec, Phase, StepContext, labelled_ce
from graftkd.methods.features import FeatureMethod, chosen_teacher
from graftkd.models.staged import StagedModel, fold_into_convs, fold_into_linear, make_bridge
from graftkd.teachers.targets import build_teacher_targets


class FSKDMethod(MethodConfig):
    """FSKD: KD, then 1x1 alignment convs fitted to one teacher's block outputs and merged."""

    name: Literal["fskd"] = "fskd"
    teacher: int | None = Field(None, ge=0, description="index into `teachers` aligned to; None: the best on validation")
    align_share: float = Field(0.2, gt=0, lt=1, description="share of the run's steps (or epochs) for the alignment")
    align_lr: float = Field(1e-3, gt=0, description="Adam lr of the alignment convs")
    teacher_map: Literal["least_squares", "identity"] = Field(
        "least_squares", description="how the teacher's map enters the student's basis (module doc)")
    ridge: float = Field(1e-3, ge=0, description="ridge of the least-squares map, relative to the mean eigenvalue")
    ce_weight: float = Field(0.1, ge=0, description="weight of CE in the train phase")
    kd_weight: float = Field(0.9, ge=0, description="weight of T^2 KL to the fused soft target (both phases)")
    temperature: float = Field(4.0, gt=0, description="T of the KD term")


class FSKD(FeatureMethod):
    def __init__(self, cfg: ExperimentConfig, student: nn.Module, targets: Any, input_size: int, name: str,
                 teacher: int) -> None:
        super().__init__(cfg, student, targets, input_size, name)
        m = cfg.method
        assert isinstance(m, FSKDMethod)
        self.m, self.k = m, teacher
        tv = self.T[teacher]
        self.align = [(t, s) for t, s in self.pairs[teacher] if self.S.consumer(s) is not None]
        if not self.align:
            raise UserError(f"method 'fskd': no boundary {tv.label} shares with {self.S.label} can take a 1x1 map")
        if m.teacher_map == "identity":
            bad = [(t, s) for t, s in self.align if tv.channels[t] != self.S.channels[s]]
            if bad:
                t, s = bad[0]
                raise UserError(f"method.teacher_map = identity needs equal widths; at {self.S.stage_names[s]} the "
                                f"student has {self.S.channels[s]} channels, {tv.label} {tv.channels[t]}")
        self.q = nn.ModuleDict({str(s): make_bridge(self.S.channels[s], self.S.channels[s], bias=False)
                                for _, s in self.align})
        for t, s in self.align:
            self.register_buffer(f"B{s}", torch.eye(self.S.channels[s], tv.channels[t]))
        self.q.requires_grad_(False)
        self.fitted = False
        self.aligning = False

    def phases(self) -> list[Phase]:
        c = self.cfg
        student = list(self.model.parameters())
        if c.trainer.steps is not None:
            align = max(1, round(c.trainer.steps * self.m.align_share))
            lengths = [{"steps": c.trainer.steps - align, "epochs": None}, {"steps": align, "epochs": None}]
        else:
            align = max(1, round(c.trainer.epochs * self.m.align_share))
            lengths = [{"epochs": c.trainer.epochs - align, "steps": None}, {"epochs": align, "steps": None}]
        return [Phase("train", optimizers=[OptimSpec([{"params": student}], c.optimizer, c.schedule)],
                      select_best=False, **lengths[0]),
                Phase("align", optimizers=[OptimSpec([{"params": list(self.q.parameters())}],
                                                     OptimizerConfig(name="adam", lr=self.m.align_lr, weight_decay=0.0),
                                                     ScheduleConfig(name="constant"))], **lengths[1])]

    def start_phase(self, phase: Phase) -> None:
        self.aligning = phase.name == "align"
        self.model.requires_grad_(not self.aligning)
        self.q.requires_grad_(self.aligning)

    def _forward(self, x: Tensor) -> tuple[dict[int, Tensor], Tensor]:
        maps = {}
        for b in range(self.S.n_stages):
            x = self.S.stage(b, x)
            if str(b) in self.q:
                x = self.q[str(b)](x)
                maps[b] = x
        return maps, self.S.head(x)

    @torch.no_grad()
    def _fit_teacher_maps(self, maps: dict[int, Tensor], t_maps: list[Tensor]) -> None:
        for t, s in self.align:
            if self.m.teacher_map == "identity":
                continue
            xs = maps[s].double().permute(0, 2, 3, 1).reshape(-1, maps[s].shape[1])
            yt = t_maps[t].double().permute(0, 2, 3, 1).reshape(-1, t_maps[t].shape[1])
            gram = yt.T @ yt
            lam = self.m.ridge * float(gram.diagonal().mean()) + 1e-12
            b = torch.linalg.solve(gram + lam * torch.eye(len(gram), dtype=gram.dtype, device=gram.device), yt.T @ xs).T
            getattr(self, f"B{s}").copy_(b.to(getattr(self, f"B{s}").dtype))
        self.fitted = True

    def training_step(self, batch: dict[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        x, y = batch["image"], batch["label"]
        maps, logits = self._forward(x)
        t = self.targets.ensemble.teachers[self.k]
        out: dict[str, Tensor] = {}
        if self.aligning:
            with torch.no_grad():
                t_maps, _ = self.T[self.k].intermediates(t.renormalised(x))
            if not self.fitted:
                self._fit_teacher_maps(maps, t_maps)
            terms = [F.mse_loss(maps[s].float(), torch.einsum("st,bthw->bshw", getattr(self, f"B{s}").float(),
                                                               t_maps[tb].float())) for tb, s in self.align]
            out["align"] = loss = torch.stack(terms).sum()
        else:
            out["ce"] = labelled_ce(logits.float(), y)
            loss = self.m.ce_weight * out["ce"]
        return self.with_kd(out, loss, logits, y, self.m, lambda: self.targets(batch))

    def eval_logits(self, images: Tensor) -> Tensor:
        return self._forward(images)[1]

    @torch.no_grad()
    def student(self) -> nn.Module:
        """The plain student with every ``Q_b`` folded into what consumes boundary b."""
        net = copy.deepcopy(self.model).eval()
        view = StagedModel(net, "student")
        for _, s in self.align:
            c = view.consumer(s)
            assert c is not None
            if c.linear is not None:
                fold_into_linear(self.q[str(s)], c.linear)
            else:
                fold_into_convs(self.q[str(s)], c.convs)
        return net

    def final_metrics(self, score: Any) -> dict[str, Any]:
        report = super().final_metrics(score)
        report["fskd"] = {"teacher": self.k, "aligned": [self.S.stage_names[s] for _, s in self.align],
                          "teacher_map": self.m.teacher_map}
        return report


@METHODS.register("fskd", config=FSKDMethod)
def build_fskd(cfg: ExperimentConfig, data: Any, build_student: Any, run_dir: Any, device: torch.device,
               dist: Any, **_: Any) -> FSKD:
    m = cfg.method
    assert isinstance(m, FSKDMethod)
    targets = build_teacher_targets(cfg, data, run_dir, device, dist, m.temperature, False)
    teacher = chosen_teacher(m.teacher, targets)
    return FSKD(cfg, build_student().to(device), targets, data.image_size, cfg.model.name, teacher)
