"""The machinery every configuration file shares: strict field types, frozen models, YAML
reading, and error messages that name the file, the path and the field.

One job: turn a YAML file into a validated pydantic model, or into a ``ConfigError`` listing
every problem at once. ``plc.config`` (the machine and recipes files) and
``plc.modbus.regmap`` (the register map and the ``fieldbus`` section) are both built on it;
the rules of the file format are written in ``plc.config``'s docstring.

Errors
    ConfigError(Exception)   -- the only exception the loaders raise for bad input.
        .path      the file at fault
        .messages  one line per problem: ``<file>: <dotted.path>: <message> (got <value>)``;
                   an item of a list that has a ``name`` is shown with it:
                   ``points[3] (temp_pump).bits``.

Pure: reads files through ``pathlib`` only; no clock, no sockets, no threads.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict, ValidationError
from pydantic_core import PydanticCustomError

#: Recipe ids, link names and the default recipe: lower-case letters, digits and '-'.
SLUG_PATTERN = r"^[a-z0-9-]+$"

# --------------------------------------------------------------------------- strict field types


def _exact_int(value: Any) -> Any:
    """Let only real integers through to a Literal of ints (pydantic would take 1.0 or true)."""
    if type(value) is not int:
        raise PydanticCustomError("int_type", "Input should be a valid integer")
    return value


def _flag(value: Any) -> bool:
    """YAML true/false, or the legacy 0/1 of the CSV files; nothing else."""
    if type(value) is bool:
        return value
    if type(value) is int and value in (0, 1):
        return bool(value)
    raise PydanticCustomError("flag_type", "Input should be true or false")


Number = Annotated[float, Strict(), Field(allow_inf_nan=False)]   # int or float, never str/bool
Int = Annotated[int, Strict()]                                     # int, never float/str/bool
Text = Annotated[str, Strict(), Field(min_length=1)]
Slug = Annotated[str, Strict(), Field(pattern=SLUG_PATTERN)]
Flag = Annotated[bool, BeforeValidator(_flag)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# --------------------------------------------------------------------------- cross-field problems

_NOTHING = object()


class _Raw(str):
    """A ``got`` value that is already formatted (shown as is, without quotes)."""


class _Problems(ValueError):
    """Several cross-field problems of one model, raised together from one validator.

    Each item is ``(sub_path, message, got)``; ``sub_path`` is appended to the location of
    the model that raised it. Pydantic wraps this ValueError into a ``value_error`` whose
    ``ctx["error"]`` is this object; ``_messages`` expands it into one line per item.
    """

    def __init__(self, items: list[tuple[tuple[str | int, ...], str, Any]]):
        super().__init__("; ".join(message for _, message, _ in items))
        self.items = items


def _raise_if(items: list[tuple[tuple[str | int, ...], str, Any]]) -> None:
    if items:
        raise _Problems(items)


def _relation(checks: Iterable[tuple[str, str, str, float, float]]) -> list:
    """Check ``a <op> b`` relations; each failing one becomes a problem at the model's path."""
    ops: dict[str, Callable[[float, float], bool]] = {
        "<": lambda a, b: a < b,
        "<=": lambda a, b: a <= b,
    }
    return [
        ((), f"{left} must be {op} {right}", _Raw(f"{left}={_show(a)}, {right}={_show(b)}"))
        for left, op, right, a, b in checks
        if not ops[op](a, b)
    ]



# --------------------------------------------------------------------------- errors


class ConfigError(Exception):
    """Bad configuration: ``.path`` the file, ``.messages`` one line per problem."""

    def __init__(self, path: str | Path, messages: list[str]):
        self.path = path
        self.messages = list(messages)
        super().__init__("\n".join(self.messages))

    def __str__(self) -> str:
        return "\n".join(self.messages)


def _show(value: Any) -> str:
    """A value as the user wrote it, short."""
    if isinstance(value, _Raw):
        return str(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping" if value else "{}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _path(loc: Iterable[str | int], data: Any = _NOTHING) -> str:
    """The dotted path of ``loc`` (``zones.pump.kp``, ``points[3]``). Given the input ``data``
    the path is walked through it: an item of a list that has a ``name`` is shown with it
    (``points[3] (temp_pump).bits``), and a part that is not in the input, such as the tag
    pydantic inserts for a member of a tagged union (``links.io.tcp.port``), is left out."""
    parts = list(loc)
    text = ""
    node = data
    for i, part in enumerate(parts):
        if isinstance(node, Mapping):
            rest = parts[i + 1:]
            if part not in node and rest and (len(rest) == 1 or rest[0] in node):
                continue               # not in the input: a union member's tag
            node = node.get(part, _NOTHING)
            text += ("." if text else "") + str(part)
        elif isinstance(node, list) and isinstance(part, int):
            node = node[part] if 0 <= part < len(node) else _NOTHING
            text += f"[{part}]"
            name = node.get("name") if isinstance(node, Mapping) else None
            if isinstance(name, str) and name:
                text += f" ({name})"
        else:
            node = _NOTHING
            if isinstance(part, int):
                text += f"[{part}]"
            else:
                text += ("." if text else "") + part
    return text or "(top level)"


def _expected(ctx: dict[str, Any]) -> str:
    # pydantic renders choices as "'none', 'odd' or 'even'"; we want "none, odd, even".
    return ctx["expected"].replace("'", "").replace(" or ", ", ")


_SIMPLE = {
    "missing": "missing field",
    "extra_forbidden": "unknown field",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "finite_number": "must be a finite number",
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "string_type": "must be a string",
    "string_too_short": "must not be empty",
    "bool_type": "must be true or false (or 1/0)",
    "flag_type": "must be true or false (or 1/0)",
    "list_type": "must be a list",
    "tuple_type": "must be a list",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
}

_NO_VALUE = {"missing", "extra_forbidden"}


def _message(kind: str, ctx: dict[str, Any], fallback: str) -> str:
    if kind in _SIMPLE:
        return _SIMPLE[kind]
    bounds = {"greater_than_equal": (">=", "ge"), "greater_than": (">", "gt"),
              "less_than_equal": ("<=", "le"), "less_than": ("<", "lt")}
    if kind in bounds:
        op, key = bounds[kind]
        bound = ctx[key]
        if isinstance(bound, float) and bound.is_integer():
            bound = int(bound)         # Field(ge=0) on a float field reports 0.0
        return f"must be {op} {bound}"
    if kind in ("literal_error", "enum"):
        return f"must be one of {_expected(ctx)}"
    if kind == "string_pattern_mismatch":
        if ctx.get("pattern") == SLUG_PATTERN:
            return "must be lower-case letters, digits and '-' only"
        return f"must match {ctx.get('pattern')}"
    if kind == "too_short":
        return f"must have at least {ctx.get('min_length')} entry"
    if kind == "value_error":
        return str(ctx["error"])
    return fallback


Problem = tuple[tuple[str | int, ...], str, Any]   # (location, message, got or _NOTHING)


def _problems(error: ValidationError) -> list[Problem]:
    """One ``(loc, message, got)`` per pydantic error; the items of ``_Problems`` expanded."""
    items: list[Problem] = []
    for err in error.errors(include_url=False):
        loc = list(err["loc"])
        kind = err["type"]
        ctx = err.get("ctx") or {}
        is_key = bool(loc) and loc[-1] == "[key]"
        if is_key:                     # a bad mapping key: report it at the key's path
            loc.pop()
        problems = ctx.get("error")
        if kind == "value_error" and isinstance(problems, _Problems):
            items += [(tuple(loc) + tuple(sub), message, got) for sub, message, got in problems.items]
        elif kind in ("union_tag_invalid", "union_tag_not_found"):
            # a tagged union (``transport: tcp | rtu``): report it at the tag's field
            field = str(ctx.get("discriminator", "")).strip("'")
            if kind == "union_tag_not_found":
                items.append((tuple(loc) + (field,), "missing field", _NOTHING))
            else:
                expected = str(ctx.get("expected_tags", "")).replace("'", "")
                items.append((tuple(loc) + (field,), f"must be one of {expected}",
                              ctx.get("tag", _NOTHING)))
        else:
            got = _NOTHING if kind in _NO_VALUE else err.get("input", _NOTHING)
            if is_key:
                got = loc[-1]
            message = _message(kind, ctx, err["msg"])
            items.append((tuple(loc), ("key " if is_key else "") + message, got))
    return items


def _line(file: str, loc: Iterable[str | int], message: str, got: Any = _NOTHING,
          data: Any = _NOTHING) -> str:
    """``<file>: <path>: <message> (got <value>)``; see ``_path`` for ``data``."""
    suffix = "" if got is _NOTHING else f" (got {_show(got)})"
    return f"{file}: {_path(loc, data)}: {message}{suffix}"


def _messages(file: str, error: ValidationError, data: Any = _NOTHING) -> list[str]:
    """One ``<file>: <path>: <message> (got <value>)`` line per pydantic error."""
    return [_line(file, loc, message, got, data) for loc, message, got in _problems(error)]


# --------------------------------------------------------------------------- YAML reading

_BOOL = "tag:yaml.org,2002:bool"
_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core-schema scalars and duplicate keys rejected."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:
                continue               # unhashable key: the base class reports it
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_BOOL, _INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    _BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Loader.add_implicit_resolver(
    _INT, re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"), list("-+0123456789"))
_Loader.add_implicit_resolver(
    _FLOAT,
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
               r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node)
    if text.startswith("0x"):
        return int(text[2:], 16)
    if text.startswith("0o"):
        return int(text[2:], 8)
    return int(text, 10)               # "010" is ten, not eight


def _construct_float(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> float:
    text = loader.construct_scalar(node).lower()
    if text.endswith(".inf"):
        return -math.inf if text.startswith("-") else math.inf
    if text == ".nan":
        return math.nan
    return float(text)


_Loader.add_constructor(_INT, _construct_int)
_Loader.add_constructor(_FLOAT, _construct_float)


def _read_text(path: str | Path, encoding: str = "utf-8") -> str:
    """The text of a file; ConfigError (one message naming the file) if it cannot be read."""
    file = str(path)
    try:
        return Path(path).read_bytes().decode(encoding)
    except FileNotFoundError:
        raise ConfigError(path, [f"{file}: no such file"]) from None
    except IsADirectoryError:
        raise ConfigError(path, [f"{file}: is a directory, not a file"]) from None
    except OSError as exc:
        raise ConfigError(path, [f"{file}: cannot read: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(path, [f"{file}: not UTF-8 text (byte {exc.start})"]) from None


def _read_mapping(path: str | Path) -> dict:
    """Read a YAML file whose top level must be a mapping; ConfigError otherwise."""
    file = str(path)
    text = _read_text(path)
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{file}:{mark.line + 1}:{mark.column + 1}" if mark else file
        problem = exc.problem or exc.context or "invalid YAML"
        if exc.context and exc.problem:
            started = exc.context_mark
            at = f" started at line {started.line + 1}" if started and started is not mark else ""
            problem = f"{exc.problem} ({exc.context}{at})"
        raise ConfigError(path, [f"{where}: {problem}"]) from None
    except (yaml.YAMLError, ValueError) as exc:
        raise ConfigError(path, [f"{file}: invalid YAML: {exc}"]) from None
    if data is None:
        raise ConfigError(path, [f"{file}: file is empty"])
    if not isinstance(data, dict):
        raise ConfigError(path, [f"{file}: top level must be a mapping of sections "
                                 f"(got a {type(data).__name__})"])
    return data


M = TypeVar("M", bound=BaseModel)


def _validate(path: str | Path, data: dict, model: type[M],
              context: dict[str, Any] | None = None) -> M:
    """``model`` validated from ``data`` (read from ``path``); ConfigError with every problem.
    ``context`` reaches the model's validators (``info.context``)."""
    try:
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        raise ConfigError(path, _messages(str(path), exc, data)) from None
