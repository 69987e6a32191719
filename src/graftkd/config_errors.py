"""One-line messages for a config's pydantic validation errors: each names the dotted key, and an
unknown key gets the closest valid one ("did you mean ...?"). Pydantic introspection only, kept
apart from the schema (config.py), which calls ``format_validation_error``.

A discriminated union (the ``method`` section) is described by ``tags``: tag -> model class;
pydantic puts the tag into error locations (``method.kd.temprature``), which the messages drop.
"""
from __future__ import annotations

import difflib
from typing import Any, Mapping

from pydantic import BaseModel, ValidationError

Tags = Mapping[str, type[BaseModel]]


Overrides = tuple[tuple[list[str], str], ...]


def format_validation_error(err: ValidationError, raw: dict, source: str, root: type[BaseModel], tags: Tags,
                            overrides: Overrides = ()) -> str:
    """One line per problem of validating ``raw`` as ``root``, each headed by where the bad key or
    value came from (``source``, the file, or the command-line override (parts, text) that set it);
    problems from one origin share the heading."""
    lines: list[tuple[str, str]] = []
    for e in err.errors():
        loc = [p for p in e["loc"] if not (isinstance(p, str) and p in tags and p not in root.model_fields)]
        key = ".".join(str(p) for p in loc)
        origin = _origin(loc, overrides, source)
        if e["type"] == "extra_forbidden":
            owner = _model_at(tuple(loc[:-1]), raw, root, tags)
            hint = ""
            if owner is not None:
                close = difflib.get_close_matches(str(loc[-1]), list(owner.model_fields), n=1, cutoff=0.5)
                hint = f"; did you mean '{'.'.join(str(p) for p in loc[:-1] + [close[0]])}'?" if close else \
                    f" (valid: {', '.join(owner.model_fields)})"
            lines.append((origin, f"unknown config key '{key}'{hint}"))
        elif e["type"] == "union_tag_invalid":
            lines.append((_origin(loc + ["name"], overrides, source),
                          f"config key '{key}.name': unknown method {e['input'].get('name')!r} "
                          f"(known: {', '.join(tags)})" if isinstance(e.get("input"), dict) else
                          f"config key '{key}': {e['msg']}"))
        else:
            value = e.get("input")
            shown = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
            lines.append((origin, f"config key '{key}' = {shown}: {e['msg']}"))
    out: list[str] = []
    for i, (origin, text) in enumerate(lines):
        out.append(text if i and lines[i - 1][0] == origin else f"{origin}: {text}")
    return "; ".join(out)


def _origin(loc: list, overrides: Overrides, source: str) -> str:
    """Where the value at ``loc`` came from: the last command-line override that set it (or a section
    above or below it), else the file."""
    path = [str(p) for p in loc]
    for parts, text in reversed(overrides):
        n = min(len(parts), len(path))
        if parts[:n] == path[:n]:
            return f"command line '{text}'"
    return source


def _model_at(loc: tuple, raw: Any, root: type[BaseModel], tags: Tags) -> type[BaseModel] | None:
    """The pydantic model class that owns the field at ``loc`` (``raw`` picks union members)."""
    cls: Any = root
    node = raw
    for part in loc:
        if cls is None:
            return None
        if isinstance(part, int):
            node = node[part] if isinstance(node, list) and part < len(node) else None
            continue
        fields = cls.model_fields
        if part not in fields:
            return cls
        node = node.get(part) if isinstance(node, dict) else None
        cls = _resolve(fields[part].annotation, node, tags)
    return cls


def _resolve(ann: Any, node: Any, tags: Tags) -> Any:
    """The model class an annotation stands for at ``node`` (a union member by its tag, a list's item)."""
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    args = getattr(ann, "__args__", ()) or ()
    if getattr(ann, "__metadata__", None) is not None:  # Annotated[...]
        return _resolve(args[0], node, tags)
    models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
    if len(models) > 1 and isinstance(node, dict):
        return tags.get(str(node.get("name")))  # a union member by its tag (pydantic checked it is there)
    if models:
        return models[0]
    for a in args:  # list[Model]
        r = _resolve(a, node[0] if isinstance(node, list) and node else None, tags)
        if r is not None:
            return r
    return None
