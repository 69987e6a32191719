"""Deep mutual learning (methods.md I.5, II.3.4): K peers trained together from scratch.

Peer k minimises ``ce_weight * CE(s_k, y) + kd_weight * mean_{j != k} T^2 KL(p_j || p_k)`` with the
other peers detached, plus ``teacher_weight * T^2 KL(p_fused || p_k)`` when teachers are given.
The optimised loss is the sum over peers; since every other peer is a constant in peer k's terms,
each peer's gradient comes from its own loss only. Peer 0 is ``model`` (the student); the others
(``method.peers``) are saved beside it as ``peer<k>.pt``.
"""
from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from graftkd.config import ExperimentConfig, MethodConfig, ModelConfig
from graftkd.errors import UserError
from graftkd.losses import dml_loss, kd_loss_from_probs
from graftkd.methods.base import METHODS, ExtraOutput, Method, Phase, StepContext, labelled_acc, labelled_ce, single_phase
from graftkd.methods.kd import agreement
from graftkd.models import count_params, create_model
from graftkd.teachers.targets import Score, TeacherTargets, build_teacher_targets, teachers_report


class DMLMethod(MethodConfig):
    """Deep mutual learning: `model` (peer 0, the student) and `peers` trained together from scratch."""

    name: Literal["dml"] = "dml"
    peers: list[ModelConfig] = Field(default_factory=list, description="extra peers besides `model` (at least one); "
                                                                       "each saved as peer<k>.pt")
    temperature: float = Field(1.0, gt=0, description="T of the mutual KL terms (DML: 1)")
    ce_weight: float = Field(1.0, ge=0, description="weight of each peer's CE to the labels")
    kd_weight: float = Field(1.0, ge=0, description="weight of mean_j T^2 KL(p_j || p_self) over the other (detached) peers")
    teacher_weight: float = Field(0.0, ge=0, description="weight of an extra KD term to the fused teachers' target")


class DML(Method):
    def __init__(self, cfg: ExperimentConfig, peers: list[nn.Module], names: list[str],
                 targets: TeacherTargets | None, peer_kwargs: list[dict[str, Any]] | None = None) -> None:
        super().__init__()
        m = cfg.method
        assert isinstance(m, DMLMethod)
        if len(peers) < 2:
            raise UserError("dml needs at least two peers: `model` plus one or more `method.peers`")
        if m.teacher_weight > 0 and targets is None:
            raise UserError("method.teacher_weight > 0 needs teachers: add a `teachers:` list or set it to 0")
        self.cfg, self.m = cfg, m
        self.peers = nn.ModuleList(peers)
        self.names = names
        self.peer_kwargs = peer_kwargs or [{} for _ in peers]
        self.targets = targets
        if targets is not None:
            self.frozen = [targets]

    def phases(self) -> list[Phase]:
        return single_phase(self.cfg, self.peers.parameters())

    def training_step(self, batch: dict[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        m, y = self.m, batch["label"]
        logits = [peer(batch["image"]) for peer in self.peers]
        target = self.targets(batch) if self.targets is not None else None
        total = torch.zeros((), device=y.device)
        out: dict[str, torch.Tensor] = {}
        for k, s in enumerate(logits):
            ce = labelled_ce(s.float(), y)
            mutual = dml_loss(s, [z for j, z in enumerate(logits) if j != k], m.temperature)
            loss = m.ce_weight * ce + m.kd_weight * mutual
            if target is not None and m.teacher_weight > 0:
                loss = loss + m.teacher_weight * kd_loss_from_probs(s, target, m.temperature)
            total = total + loss
            out[f"acc_peer{k}"] = labelled_acc(s, y)
            if k == 0:
                out.update(ce=ce, dml=mutual)
        out["acc"] = out["acc_peer0"]
        out["peer_agreement"] = torch.stack([(logits[0].argmax(1) == z.argmax(1)).float().mean()
                                             for z in logits[1:]]).mean()
        if target is not None:
            out["agreement"] = agreement(logits[0], target)
        return {"loss": total, **out}

    def uses_unlabeled(self) -> bool:
        """With teachers and ``teacher_weight`` > 0: the teacher term (and the mutual terms) learn from
        every image, CE from the labelled ones; without a teacher term DML refuses ``data.unlabeled``."""
        return self.targets is not None and self.m.teacher_weight > 0

    def student(self) -> nn.Module:
        return self.peers[0]

    def extra_outputs(self) -> dict[str, ExtraOutput]:
        return {f"peer{k}": ExtraOutput(self.peers[k], self.names[k], kwargs=self.peer_kwargs[k])
                for k in range(1, len(self.peers))}

    def final_metrics(self, score: Score) -> dict[str, Any]:
        report: dict[str, Any] = teachers_report(self.targets.ensemble, score) if self.targets is not None else {}
        report["peers"] = [{"name": n, "params": count_params(p), "val": score(p, "val"), "test": score(p, "test")}
                           for n, p in zip(self.names, self.peers)]
        report["params"] = {"student": count_params(self.peers[0]),
                            "peers": [count_params(p) for p in self.peers],
                            "teachers": [t["params"] for t in report.get("teachers", [])]}
        return report


@METHODS.register("dml", config=DMLMethod)
def build_dml(cfg: ExperimentConfig, data: Any, build_student: Any, run_dir: Any, device: torch.device, dist: Any,
              **_: Any) -> DML:
    m = cfg.method
    assert isinstance(m, DMLMethod)
    peers = [build_student()]
    for pc in m.peers:
        peer = create_model(pc.name, num_classes=data.num_classes, pretrained=pc.pretrained, checkpoint=pc.checkpoint,
                            **pc.kwargs)
        peers.append(peer)
    targets = build_teacher_targets(cfg, data, run_dir, device, dist, m.temperature, False) if cfg.teachers else None
    return DML(cfg, peers, [cfg.model.name] + [pc.name for pc in m.peers], targets,
               [dict(cfg.model.kwargs)] + [dict(pc.kwargs) for pc in m.peers])
