"""Typed pass options declared as frozen dataclasses.

A pass declares ``Options`` as a frozen dataclass. Each field is an option: its text key is the
field name with ``_`` replaced by ``-``, its help text is ``field(metadata={"help": ...})``. Supported
field types: ``bool``, ``int``, ``float``, ``str``, an ``Enum`` subclass (by value), a ``Literal`` of
strings, ``tuple[T, ...]`` and ``T | None``. Text and Python build options through the same
:func:`build_options`, so both get the same validation and the same errors.
"""
from __future__ import annotations

import dataclasses
import enum
import functools
import math
import numbers
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Union

from .errors import OptionError
from .suggest import did_you_mean


@dataclass(frozen=True)
class NoOptions:
    """Options of a pass that takes none."""


@dataclass(frozen=True)
class QuotedStr:
    """A raw option value written in quotes: always a string, never a list or a number."""
    text: str


# A raw option value as parsed from text: an atom, a quoted string, or a list of raw values.
RawValue = Union[str, QuotedStr, list]


@dataclass(frozen=True)
class OptionInfo:
    """One option of a pass, as listed by ``--list-passes`` and docs."""
    key: str            # kebab-case text key
    field: str          # python field name
    type: Any
    default: Any
    help: str
    required: bool

    @property
    def type_name(self) -> str:
        return type_name(self.type)


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is bool:
        return "bool"
    if tp is int:
        return "int"
    if tp is float:
        return "float"
    if tp is str:
        return "str"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "{" + "|".join(str(m.value) for m in tp) + "}"
    if origin is Literal:
        return "{" + "|".join(str(a) for a in typing.get_args(tp)) + "}"
    if origin is tuple:
        return f"list<{type_name(typing.get_args(tp)[0])}>"
    inner = _optional_inner(tp)
    if inner is not None:
        return f"{type_name(inner)}?"
    return getattr(tp, "__name__", str(tp))


def _optional_inner(tp: Any) -> Any | None:
    origin = typing.get_origin(tp)
    if origin is Union or origin is types.UnionType:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0]
    return None


def _check_supported(owner: str, name: str, tp: Any) -> None:
    origin = typing.get_origin(tp)
    if tp in (bool, int, float, str):
        return
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return
    if origin is Literal and all(isinstance(a, str) for a in typing.get_args(tp)):
        return
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            _check_supported(owner, name, args[0])
            return
    inner = _optional_inner(tp)
    if inner is not None:
        _check_supported(owner, name, inner)
        return
    raise TypeError(f"{owner}: option field '{name}' has unsupported type {tp!r} "
                    "(use bool, int, float, str, Enum, Literal[...], tuple[T, ...] or T | None)")


def option_infos(options_cls: type) -> list[OptionInfo]:
    """The options of a frozen options dataclass, sorted by key (the canonical order)."""
    return list(_option_infos(options_cls))


@functools.lru_cache(maxsize=None)
def _option_infos(options_cls: type) -> tuple[OptionInfo, ...]:
    # Cached per class: resolving the type hints is what building a pipeline spends its time on.
    if not (dataclasses.is_dataclass(options_cls) and options_cls.__dataclass_params__.frozen):
        raise TypeError(f"{options_cls!r} must be a frozen dataclass")
    hints = typing.get_type_hints(options_cls, include_extras=False)
    infos = []
    for f in dataclasses.fields(options_cls):
        tp = hints[f.name]
        _check_supported(options_cls.__qualname__, f.name, tp)
        if f.default is not dataclasses.MISSING:
            default, required = f.default, False
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default, required = f.default_factory(), False  # type: ignore[misc]
        else:
            default, required = None, True
        infos.append(OptionInfo(key=f.name.replace("_", "-"), field=f.name, type=tp,
                                default=default, help=f.metadata.get("help", ""),
                                required=required))
    return tuple(sorted(infos, key=lambda i: i.key))


# ---------------------------------------------------------------------------------------------
# Converting values (raw text or Python) to the declared type


class _Invalid(Exception):
    """Internal: a value does not fit the declared type; carries the reason."""


# Python's int literal rules: an underscore only between digits (4_096, not 4_ or 4__0).
_INT_RE = re.compile(r"^[+-]?(0|[1-9](_?[0-9])*|0[xX][0-9a-fA-F](_?[0-9a-fA-F])*)$")


def _convert(value: Any, tp: Any, from_text: bool) -> Any:
    inner = _optional_inner(tp)
    if inner is not None:
        if value is None or (from_text and value == "none"):
            return None
        return _convert(value, inner, from_text)
    origin = typing.get_origin(tp)
    if origin is tuple:
        elem = typing.get_args(tp)[0]
        if from_text and isinstance(value, str) and not isinstance(value, QuotedStr):
            value = [value]  # a single atom is a one-element list
        if isinstance(value, (str, bytes, QuotedStr)) or not isinstance(value, (list, tuple)):
            raise _Invalid(f"expected a list of {type_name(elem)}, e.g. [1,2]")
        return tuple(_convert(v, elem, from_text) for v in value)
    if isinstance(value, QuotedStr):
        if tp is str or origin is Literal or (isinstance(tp, type) and issubclass(tp, enum.Enum)):
            value = value.text
        else:
            raise _Invalid(f"a quoted string is not a valid {type_name(tp)}")
    if isinstance(value, list):
        raise _Invalid(f"expected a single {type_name(tp)}, not a list")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if from_text and value in ("true", "false", "1", "0"):
            return value in ("true", "1")
        raise _Invalid(f"'{value}' is not a valid bool (true or false)")
    if tp is int:
        if isinstance(value, bool):
            raise _Invalid("expected an int, got a bool")
        if isinstance(value, numbers.Integral):  # int, numpy and torch integer scalars
            return int(value)
        if from_text and isinstance(value, str) and _INT_RE.match(value):
            return int(value, 0)
        # A float is not an int, even 4.0: the text form rejects '4.0' as well.
        raise _Invalid(f"{value!r} is not a valid int" if not isinstance(value, str)
                       else f"'{value}' is not a valid int")
    if tp is float:
        if isinstance(value, bool):
            raise _Invalid("expected a float, got a bool")
        if isinstance(value, numbers.Real):
            if math.isnan(value):
                raise _Invalid("nan is not allowed")
            return float(value)
        if from_text and isinstance(value, str):
            try:
                out = float(value)
            except ValueError:
                raise _Invalid(f"'{value}' is not a valid float") from None
            if math.isnan(out):
                raise _Invalid("nan is not allowed")
            return out
        raise _Invalid(f"'{value}' is not a valid float")
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Invalid(f"expected a string, got {type(value).__name__}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, enum.Enum):
            value = value.value
        if value in choices:
            return value
        raise _Invalid(f"'{value}' is not one of {', '.join(map(str, choices))}"
                       + did_you_mean(str(value), [str(c) for c in choices]))
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        if isinstance(value, tp):
            return value
        for member in tp:
            if member.value == value or (from_text and str(member.value) == value):
                return member
        choices = [str(m.value) for m in tp]
        raise _Invalid(f"'{value}' is not one of {', '.join(choices)}"
                       + did_you_mean(str(value), choices))
    raise _Invalid(f"unsupported type {tp!r}")


def build_options(pass_name: str, options_cls: type, values: dict[str, Any], *,
                  from_text: bool = False, key_positions: dict[str, Any] | None = None) -> Any:
    """Build and validate an options instance from keyword values (Python names or text keys).

    Raises OptionError naming the pass, the option and the valid choices. ``__post_init__``
    validation errors (ValueError) of the dataclass are re-raised as OptionError as well.
    """
    infos = {i.key: i for i in option_infos(options_cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        text_key = key.replace("_", "-")
        info = infos.get(text_key)
        if info is None:
            valid = ", ".join(infos) or "none"
            raise OptionError(pass_name, text_key,
                              f"no such option (valid options: {valid})"
                              + did_you_mean(text_key, list(infos)))
        if info.field in kwargs:
            raise OptionError(pass_name, text_key, "given more than once")
        try:
            kwargs[info.field] = _convert(value, info.type, from_text)
        except _Invalid as e:
            raise OptionError(pass_name, text_key,
                              f"{e} (expected {info.type_name})") from None
    missing = [i.key for i in infos.values() if i.required and i.field not in kwargs]
    if missing:
        raise OptionError(pass_name, missing[0], "is required and was not given")
    try:
        return options_cls(**kwargs)
    except OptionError:
        raise
    except (ValueError, TypeError) as e:
        raise OptionError(pass_name, None, f"invalid options: {e}") from None


def options_to_dict(options: Any) -> dict[str, Any]:
    """Text key -> value, sorted by key."""
    return {i.key: getattr(options, i.field) for i in option_infos(type(options))}


# ---------------------------------------------------------------------------------------------
# Canonical printing

_BARE_ATOM = re.compile(r"^[A-Za-z0-9_.+\-/:*?@%^~#|<>!]+$")


def format_value(value: Any) -> str:
    """Canonical text of one option value (bools true/false, floats by repr, lists {a,b})."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return format_value(value.value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, (tuple, list)):
        return "{" + ",".join(format_value(v) for v in value) + "}"
    if isinstance(value, str):
        if _BARE_ATOM.match(value) and value not in ("none", "true", "false"):
            return value
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    raise TypeError(f"cannot print option value {value!r}")


def format_options(options: Any) -> str:
    """``{k1=v1 k2=v2}`` with all options sorted by key, defaults included; '' when none."""
    items = options_to_dict(options)
    if not items:
        return ""
    return "{" + " ".join(f"{k}={format_value(v)}" for k, v in items.items()) + "}"
