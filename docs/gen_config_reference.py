"""Generate the configuration key reference of docs/configuration.md from graftkd.config.

The tables are built from the pydantic models themselves (field names, types, defaults,
constraints, descriptions), so they cannot drift from the code:

    .venv/bin/python docs/gen_config_reference.py           # print the Markdown
    .venv/bin/python docs/gen_config_reference.py --write   # replace the generated part of configuration.md
    .venv/bin/python docs/gen_config_reference.py --check   # exit 1 if configuration.md is out of date

A field's meaning is its ``description`` in config.py (or the method's module for ``method.*``). Fields without one get the short text in
``FALLBACK`` below (keyed by the dotted key); ``--check`` also fails when a FALLBACK entry names a
key that no longer exists, or when a key has neither a description nor a fallback.
"""
from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any, Iterator, Literal, Union

from pydantic import BaseModel
from pydantic.fields import FieldInfo

import graftkd.methods  # noqa: F401  registers every method and its config section
from graftkd import config as C

DOC = Path(__file__).resolve().parent / "configuration.md"
BEGIN = "<!-- BEGIN GENERATED CONFIG REFERENCE (docs/gen_config_reference.py) -->"
END = "<!-- END GENERATED CONFIG REFERENCE -->"

#: the order of the method tables (the default first); methods not listed follow alphabetically
METHOD_ORDER = ["supervised", "kd", "dkd", "dml", "atf", "graft", "fitnet", "at", "mir", "fskd"]

#: meanings of fields that have no ``description`` in config.py (dotted keys; method keys as
#: ``method.<field>`` for the method whose ``name`` is given in brackets).
FALLBACK: dict[str, str] = {
    "name": "experiment name; the run folder is output.dir/(output.name or name)",
    "seed": "experiment seed: weights, sampler order, augmentation views, and the split when data.split.seed is null",
    "data.source": "where images come from (see docs/data.md)",
    "data.task": "BreakHis/synthetic: binary (benign, malignant) or subtype (8 classes)",
    "data.magnification": "BreakHis/synthetic: keep only this magnification (all: every image)",
    "data.image_size": "side of the square network input, in pixels",
    "data.augment": "training augmentation preset (docs/data.md); none = the evaluation transform",
    "data.std": "normalisation std; null: the source's preset",
    "data.batch_size": "training batch per process (graft may scale it with shots)",
    "data.eval_batch_size": "batch for validation, test, teacher scoring and cache building",
    "data.num_workers": "DataLoader worker processes",
    "data.decoded_cache": "cache of decoded, resized base images: none, memory (per process) or mmap (file shared "
                          "by workers and later runs)",
    "data.split.kind": "fraction: stratified group split by fractions; kfold: k group folds; official: BreakHis "
                       "Folds.csv; predefined: the source's own train/test (CIFAR, CSV split column, folder train/ test/)",
    "data.split.train": "kind=fraction: fraction of groups for train",
    "data.split.val": "kind=fraction: fraction of groups for val",
    "data.split.test": "kind=fraction: fraction of groups for test",
    "data.synthetic.magnifications": "magnifications to render",
    "data.synthetic.seed": "generator seed",
    "model.name": "student architecture: one of ours (`graftkd models`) or any timm name (`timm:` forces timm)",
    "model.checkpoint": "a graftkd model file (or run folder) to start from; arch and class count must match",
    "teachers[i].name": "teacher architecture; checked against the model file's arch when given explicitly",
    "teachers[i].checkpoint": "a graftkd model file (`graftkd train` output, run/model.pt)",
    "teachers[i].std": "input normalisation std; null: from the checkpoint or the data",
    "method.peers[i].name": "peer architecture",
    "method.peers[i].checkpoint": "a graftkd model file to initialise this peer from",
    "optimizer.name": "sgd, adam or adamw",
    "optimizer.lr": "base learning rate (per optimiser; teachers in atf use lr_ratio x this)",
    "optimizer.momentum": "sgd momentum",
    "optimizer.nesterov": "sgd Nesterov momentum",
    "optimizer.weight_decay": "weight decay (coupled for sgd/adam, decoupled for adamw)",
    "optimizer.betas": "adam/adamw betas",
    "schedule.name": "lr schedule per optimiser step: constant, multistep, cosine (to min_lr)",
    "schedule.gamma": "multistep: lr factor at each milestone",
    "schedule.min_lr": "cosine: final lr",
    "trainer.device": "auto: cuda if available, else cpu",
    "trainer.channels_last": "channels-last memory format for the networks and images",
    "trainer.grad_clip": "clip the global gradient norm of the trained parameters at this value",
    "trainer.deterministic": "cudnn deterministic, no cudnn benchmark",
    "trainer.select_metric": "validation metric for best.pt / model.pt: val_acc (max) or val_loss (min)",
    "trainer.progress": "tqdm progress bar",
    "output.dir": "parent folder of run folders",
    "output.tensorboard": "write TensorBoard scalars to run/tb",
    "method.name[supervised]": "method selector",
    "method.label_smoothing[supervised]": "label smoothing of the CE",
    "method.name[kd]": "method selector",
    "method.name[dkd]": "method selector",
    "method.name[dml]": "method selector",
    "method.name[atf]": "method selector",
    "method.mode[atf]": "atf, or a comparison mode: offline, offline_joint, online (docs/methods/atf.md)",
    "method.name[graft]": "method selector",
    "method.name[fitnet]": "method selector",
    "method.name[at]": "method selector",
    "method.name[mir]": "method selector",
    "method.name[fskd]": "method selector",
    "method.divergence.kind": "kl, alpha (AlphaNet) or alpha_beta (ABKD)",
    "method.divergence.alpha": "alpha of kind=alpha (fixed) and kind=alpha_beta",
    "method.divergence.beta": "beta of kind=alpha_beta",
    "method.divergence.alpha_min": "kind=alpha, adaptive: lower alpha",
    "method.divergence.alpha_max": "kind=alpha, adaptive: upper alpha",
    "method.divergence.iw_clip": "kind=alpha: clip of the importance weight (p/q)^alpha",
    "method.stage1.weight_decay": "Adam weight decay",
    "method.stage2.weight_decay": "Adam weight decay",
}


# ------------------------------------------------------------------------------------- types
def _unwrap_annotated(ann: Any) -> tuple[Any, list[Any]]:
    meta: list[Any] = []
    while typing.get_origin(ann) is typing.Annotated:
        args = typing.get_args(ann)
        ann, extra = args[0], args[1:]
        for e in extra:
            meta += list(getattr(e, "metadata", [])) if isinstance(e, FieldInfo) else [e]
    return ann, meta


def type_name(ann: Any) -> str:
    ann, meta = _unwrap_annotated(ann)
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (Union, types.UnionType):
        parts = [a for a in args if a is not type(None)]
        base = " \\| ".join(type_name(a) for a in parts)
        return f"{base} or null" if len(parts) < len(args) else base
    if origin in (list, typing.List):
        inner = type_name(args[0])
        cons = constraints_text(_unwrap_annotated(args[0])[1])
        return f"list[{inner}{' ' + cons if cons else ''}]"
    if origin is tuple:
        return "[" + ", ".join(type_name(a) for a in args) + "]"
    if origin is dict:
        return "mapping"
    if isinstance(ann, type) and issubclass(ann, Path):
        return "path"
    if ann is typing.Any:
        return "any"
    return getattr(ann, "__name__", str(ann))


def constraints_text(meta: list[Any]) -> str:
    out = []
    for m in meta:
        for attr, sym in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="), ("min_length", "min length")):
            v = getattr(m, attr, None)
            if v is not None:
                out.append(f"{sym} {v}")
    return ", ".join(out)


def default_text(field: FieldInfo) -> str:
    return default_value(field.default_factory() if field.default_factory is not None else field.default)


def default_value(value: Any) -> str:
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, tuple):
        value = list(value)
    return "`" + json.dumps(value) + "`"


def _model_class(ann: Any) -> type[BaseModel] | None:
    ann, _ = _unwrap_annotated(ann)
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    return None


def _list_model_class(ann: Any) -> type[BaseModel] | None:
    ann, _ = _unwrap_annotated(ann)
    if typing.get_origin(ann) in (list, typing.List):
        return _model_class(typing.get_args(ann)[0])
    return None


# ------------------------------------------------------------------------------------- rows
Row = tuple[str, str, str, str, str]  # key, type, default, constraints, meaning


def rows_of(cls: type[BaseModel], prefix: str, method: str | None, used: set[str],
            instance: BaseModel | None = None) -> Iterator[Row]:
    """Rows of ``cls``'s fields; defaults from ``instance`` when given (a nested field whose
    default differs from its class defaults, e.g. ATF's ``divergence``)."""
    for name, field in cls.model_fields.items():
        key = prefix + name
        sub = _model_class(field.annotation)
        if sub is not None:
            nested = getattr(instance, name) if instance is not None else field.default
            yield from rows_of(sub, key + ".", method, used, nested if isinstance(nested, BaseModel) else None)
            continue
        sub = _list_model_class(field.annotation)
        if sub is not None:
            yield (key, f"list of {sub.__name__}", default_text(field), "", meaning(key, field, method, used)
                   or f"a list; each entry has the `{key}[i].*` keys below")
            yield from rows_of(sub, key + "[i].", method, used)
            continue
        _, meta = _unwrap_annotated(field.annotation)
        cons = constraints_text(list(field.metadata) + meta)
        default = default_text(field) if instance is None else default_value(getattr(instance, name))
        yield key, type_name(field.annotation), default, cons, meaning(key, field, method, used)


def meaning(key: str, field: FieldInfo, method: str | None, used: set[str]) -> str:
    if field.description:
        return field.description
    for k in ((f"{key}[{method}]", key) if method else (key,)):
        if k in FALLBACK:
            used.add(k)
            return FALLBACK[k]
    return ""


def table(rows: list[Row]) -> str:
    esc = lambda s: s.replace("|", "\\|") if "\\|" not in s else s  # noqa: E731
    lines = ["| key | type | default | constraint | meaning |", "|---|---|---|---|---|"]
    lines += [f"| `{k}` | {t} | {d} | {c} | {esc(m)} |" for k, t, d, c, m in rows]
    return "\n".join(lines)


SECTIONS = ("name", "seed", "data", "model", "teachers", "fusion", "teacher_cache", "method", "optimizer",
            "schedule", "trainer", "output")


def generate() -> tuple[str, list[str]]:
    """(Markdown, problems) for the whole reference."""
    used: set[str] = set()
    all_rows: list[Row] = []
    out: list[str] = []
    fields = C.ExperimentConfig.model_fields
    assert tuple(fields) == SECTIONS, f"ExperimentConfig sections changed: {tuple(fields)}"
    top = [r for r in rows_of(_Top, "", None, used)]
    out += ["### Top level", "", table(top), ""]
    all_rows += top
    for section in SECTIONS[2:]:
        if section == "method":
            continue
        rows = [r for r in rows_of(_only(section), "", None, used)]
        all_rows += rows
        out += [f"### `{section}`", "", table(rows), ""]
    out += ["### `method`", "",
            "`method.name` selects one of the following key sets (a discriminated union); "
            "the default method is `supervised`.", ""]
    for name in METHOD_ORDER + sorted(set(C.METHOD_CONFIGS) - set(METHOD_ORDER)):
        cls = C.METHOD_CONFIGS.get(name)
        rows = list(rows_of(cls, "method.", name, used))
        all_rows += rows
        out += [f"#### `method.name: {name}`", "", table(rows), ""]
    problems = [f"no description and no FALLBACK entry: {r[0]}" for r in all_rows if not r[4]]
    problems += [f"FALLBACK entry for a key that does not exist: {k}" for k in sorted(set(FALLBACK) - used)]
    return "\n".join(out).rstrip() + "\n", problems


class _Top(BaseModel):
    """The two scalar top-level keys, read from ExperimentConfig."""


_Top.model_fields = {k: C.ExperimentConfig.model_fields[k] for k in ("name", "seed")}  # type: ignore[misc]


def _only(section: str) -> type[BaseModel]:
    """A model whose single field is ExperimentConfig's ``section`` (keeps the dotted prefix)."""
    cls = type(f"_Only_{section}", (BaseModel,), {})
    cls.model_fields = {section: C.ExperimentConfig.model_fields[section]}  # type: ignore[attr-defined]
    return cls


def splice(doc: str, body: str) -> str:
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"{DOC}: markers {BEGIN!r} / {END!r} not found")
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n\n{body}\n{END}{tail}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--write", action="store_true", help="rewrite the generated part of docs/configuration.md")
    g.add_argument("--check", action="store_true", help="exit 1 when docs/configuration.md is out of date")
    args = p.parse_args()
    body, problems = generate()
    for msg in problems:
        print(f"gen_config_reference: {msg}", file=sys.stderr)
    if args.write:
        DOC.write_text(splice(DOC.read_text(), body))
        print(f"wrote {DOC}")
    elif args.check:
        if splice(DOC.read_text(), body) != DOC.read_text():
            print(f"{DOC} is out of date: run python docs/gen_config_reference.py --write", file=sys.stderr)
            return 1
    else:
        sys.stdout.write(body)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
