"""The machinery under largefr.config: field constraints and help, YAML with ``base:`` chains, ``--set``
overrides, type conversion with errors naming the field, and the field listing of ``--help-config``.

Sections are dataclasses deriving from :class:`Section`; each field is declared with :func:`config_field`
(default, optional :class:`Check`, help string) or, for a nested section, :func:`section_field`.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Union, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A config value that does not fit the schema; ``path`` is the dotted field name."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"config field {path}: {message}" if path else f"config: {message}")
        self.path = path
        self.detail = message


@dataclass(frozen=True)
class Check:
    """A value constraint with the words used to describe it in errors."""

    ok: Callable[[Any], bool]
    expected: str


POSITIVE = Check(lambda v: v is None or (v > 0 and math.isfinite(v)), "a finite value > 0")
NON_NEGATIVE = Check(lambda v: v is None or (v >= 0 and math.isfinite(v)), "a finite value >= 0")
UNIT = Check(lambda v: 0.0 <= v <= 1.0, "a value in [0, 1]")
PROB = Check(lambda v: 0.0 <= v < 1.0, "a value in [0, 1)")
BETAS = Check(lambda v: all(0.0 <= b < 1.0 for b in v), "two values in [0, 1)")


def config_field(default: Any, check: Check | None = None, help: str = "") -> Any:
    """A dataclass field with a help string and an optional constraint; mutable defaults are copied."""
    meta: dict[str, Any] = {"help": help}
    if check is not None:
        meta["check"] = check
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def section_field(cls: type, help: str) -> Any:
    """A nested section, built with its defaults."""
    return field(default_factory=cls, metadata={"help": help})


class Section:
    """Base of every config section: runs the field constraints on construction."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            check: Check | None = f.metadata.get("check")
            value = getattr(self, f.name)
            if check is not None and not check.ok(value):
                raise ConfigError(f.name, f"got {value!r}, expected {check.expected}")


# ---------------------------------------------------------------------------------------------- YAML


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` as a float (YAML 1.1 wants ``1.0e-3``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def parse_scalar(text: str) -> Any:
    """A ``--set`` value as YAML would read it (``0.1``, ``1e-3``, ``true``, ``null``, ``[a, b]``)."""
    return yaml.load(text, Loader=_Loader) if text.strip() else ""


def read_yaml_chain(path: Path, root: type, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The mapping of ``path`` merged over its ``base:`` chain (each base relative to the file naming it)."""
    if path in chain:
        raise ConfigError("base", f"inheritance cycle: {' -> '.join(map(str, (*chain, path)))}")
    if not path.is_file():
        raise ConfigError("base" if chain else "", f"config file {str(path)!r} does not exist")
    raw = yaml.load(path.read_text(), Loader=_Loader) or {}
    if not isinstance(raw, dict):
        raise ConfigError("", f"{path} must hold a mapping at the top level, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError("base", f"got {base!r} in {path}, expected a file path (str)")
    parent = read_yaml_chain((path.parent / base).resolve(), root, (*chain, path))
    return merge_sections(root, parent, raw)


def merge_sections(cls: type, base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Field-wise merge for sections (dataclasses); any other value is replaced whole."""
    hints = get_type_hints(cls)
    out = dict(base)
    for key, value in override.items():
        tp = hints.get(key)
        if dataclasses.is_dataclass(tp) and isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_sections(tp, out[key], value)
        elif dataclasses.is_dataclass(tp) and value is None:
            continue  # an empty section in the child ("train:" with every key commented out) keeps the base's
        else:
            out[key] = value
    return out


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply ``a.b.c=value`` to a raw config mapping in place (the value parsed as YAML)."""
    key, sep, text = assignment.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise ConfigError("", f"override {assignment!r} is not of the form a.b.c=value")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            path = ".".join(parts[: i + 1])
            raise ConfigError(path, f"got {child!r}, cannot set {key!r} inside a value that is not a section")
        node = child
    value = parse_scalar(text)
    if value is None and isinstance(node.get(parts[-1]), dict):
        raise ConfigError(key.strip(), "is a section; set its fields (a.b=value), it cannot be replaced by null")
    node[parts[-1]] = value


# ---------------------------------------------------------------------------------------- validation


def _join(path: str, key: str | int) -> str:
    return f"{path}[{key}]" if isinstance(key, int) else (f"{path}.{key}" if path else key)


def describe_type(tp: Any) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if dataclasses.is_dataclass(tp):
        return "a mapping (section)"
    if origin is Literal:
        return f"one of {list(args)}"
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else describe_type(a) for a in args)
    if origin is list:
        return f"a list of {describe_type(args[0])}"
    if origin is tuple:
        return f"a list of {len(args)} ({', '.join(describe_type(a) for a in args)})"
    if origin is dict:
        return "a mapping"
    return {int: "int", float: "float (or int)", bool: "bool (true/false)", str: "str"}.get(tp, str(tp))


def _type_error(value: Any, tp: Any, path: str) -> ConfigError:
    return ConfigError(path, f"got {value!r} ({type(value).__name__}), expected {describe_type(tp)}")


def convert(value: Any, tp: Any, path: str = "") -> Any:
    """``value`` (plain YAML data) checked against the type ``tp``; sections become dataclasses."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return _convert_section(value, tp, path)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return convert(value, option, path)
            except ConfigError:
                continue
        raise _type_error(value, tp, path)
    if origin is Literal:
        if value in args and isinstance(value, str):
            return value
        raise _type_error(value, tp, path)
    if origin in (list, tuple):
        return _convert_sequence(value, tp, path)
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise _type_error(value, tp, path)
        return {k: convert(v, args[1], _join(path, k)) for k, v in value.items()}
    return _convert_scalar(value, tp, path)


def _convert_scalar(value: Any, tp: Any, path: str) -> Any:
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp in (bool, str) and isinstance(value, tp):
        return value
    raise _type_error(value, tp, path)


def _convert_sequence(value: Any, tp: Any, path: str) -> Any:
    args = get_args(tp)
    if not isinstance(value, (list, tuple)):
        raise _type_error(value, tp, path)
    if get_origin(tp) is list:
        return [convert(v, args[0], _join(path, i)) for i, v in enumerate(value)]
    if len(value) != len(args):
        raise _type_error(value, tp, path)
    return tuple(convert(v, a, _join(path, i)) for i, (v, a) in enumerate(zip(value, args)))


def _convert_section(value: Any, cls: type, path: str) -> Any:
    value = {} if value is None else value  # an empty YAML section ("data:") keeps the defaults
    if not isinstance(value, dict):
        raise _type_error(value, cls, path)
    hints = get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    for key in value:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(_join(path, str(key)), f"unknown field; {hint}known fields: {known}")
    kwargs = {k: convert(v, hints[k], _join(path, k)) for k, v in value.items()}
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(_join(path, exc.path), exc.detail) from None


def plain(value: Any) -> Any:
    """Tuples to lists and sections to mappings (recursively) so safe_dump writes plain YAML."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


# ------------------------------------------------------------------------------------ help and listing


@dataclass(frozen=True)
class FieldDoc:
    """One leaf field of a config: dotted path, type as declared, default, help string."""

    path: str
    type: str
    default: Any
    help: str


def flow_yaml(value: Any) -> str:
    """``value`` as one line of YAML (flow style), e.g. ``{margin: 0.5, scale: 64.0}``, ``null``."""
    text = yaml.safe_dump(plain(value), default_flow_style=True, sort_keys=False, width=2**31).strip()
    return text.removesuffix("...").strip()


def field_docs(cls: type, prefix: str = "") -> list[FieldDoc]:
    """Every leaf field of the section ``cls`` (nested sections expanded), in declaration order."""
    hints = get_type_hints(cls)
    docs: list[FieldDoc] = []
    for f in dataclasses.fields(cls):
        path = _join(prefix, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            docs += field_docs(hints[f.name], path)
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
        docs.append(FieldDoc(path, str(f.type), default, f.metadata.get("help", "")))
    return docs


def help_text(cls: type) -> str:
    """The field listing printed by ``largefr train --help-config``."""
    lines = []
    for doc in field_docs(cls):
        lines.append(f"{doc.path}: {doc.type} = {flow_yaml(doc.default)}")
        lines.append(f"    {doc.help}")
    return "\n".join(lines) + "\n"


def commented_yaml(section: Any, indent: str = "") -> str:
    """Block YAML of a section instance, each field followed by its help as a comment (loads back equal)."""
    lines = []
    for f in dataclasses.fields(section):
        value, note = getattr(section, f.name), f.metadata.get("help", "")
        comment = f"  # {note}" if note else ""
        if dataclasses.is_dataclass(value):
            lines.append(f"{indent}{f.name}:{comment}")
            lines.append(commented_yaml(value, indent + "  ").rstrip("\n"))
        else:
            lines.append(f"{indent}{f.name}: {flow_yaml(value)}{comment}")
    return "\n".join(lines) + "\n"
