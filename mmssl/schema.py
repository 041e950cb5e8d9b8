"""Typed configs from plain data: dataclasses <- dicts (JSON/YAML) and `key=value` overrides.

Every config in mmssl is a dataclass.  `from_dict` is strict: an unknown key or a value of
the wrong type raises `ConfigError` naming the dotted key (and the closest valid key).
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import json
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")
_YAML11_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class ConfigError(ValueError):
    """A config value that does not fit its schema.  The message names the dotted key."""


QUOTE_KEYS = "YAML reads the keys on, off, yes, no and null as true, false and null: quote them"


def _yaml_word(key: Any) -> bool:
    """A mapping key YAML 1.1 read as a boolean or null (`on:`, `no:`, `null:`), not as text."""
    return isinstance(key, bool) or key is None


def suggest(key: str, valid: typing.Iterable[str]) -> str:
    """A hint for an unknown `key`: " (did you mean 'X'?)" with the closest of `valid`, or ""
    when none is close."""
    close = difflib.get_close_matches(key, list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class Override:
    """A `key=value` override's scalar as given on the command line: `text` and the `value`
    YAML parses it to.  A str field takes the text (`name=42` is "42", `name=no` "no"), any
    other field the value, with today's errors (`train.steps=x`: expected an integer)."""

    __slots__ = ("text", "value")

    def __init__(self, text: str, value: Any) -> None:
        self.text, self.value = text, value

    def __repr__(self) -> str:
        return f"Override({self.text!r}, {self.value!r})"


def _plain(value: Any) -> Any:
    """`value` with every Override replaced by its parsed value (for fields typed Any)."""
    if isinstance(value, Override):
        return value.value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _convert_override(value: Override, tp: Any, where: str) -> Any:
    """A command-line scalar: its text for a str field (and a Literal's text member), its
    parsed value for any other.  In a union, str is tried last (`int | str` takes 42 as 42)
    and null is None for an optional field."""
    args = typing.get_args(tp)
    if tp is str:
        return value.text
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and str in args:
        if value.value is None and type(None) in args:
            return None
        for arg in (a for a in args if a not in (str, type(None))):
            try:
                return _convert(value.value, arg, where)
            except ConfigError:
                pass
        return value.text
    if typing.get_origin(tp) is typing.Literal and value.value not in args and value.text in args:
        return value.text
    return _convert(value.value, tp, where)


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if isinstance(value, Override):
        return _convert_override(value, tp, where)
    if tp is Any:
        return _plain(value)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(
            errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {tp}"
        )
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        item = args[0] if args else Any
        return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        vt = args[1] if args else Any
        odd = [k for k in value if _yaml_word(k)]  # `str` made a source of `on:` named "True"
        if odd:
            raise ConfigError(f"{where}: key {odd[0]!r} ({QUOTE_KEYS})")
        return {str(k): _convert(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _YAML11_FLOAT.fullmatch(value.strip()):
            # PyYAML follows YAML 1.1, where `3e-4` (no dot) is a string, not a number.
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported field type {tp}")


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass `cls` from `data`, checking every key and type; missing keys keep defaults."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{where}.{key}" if where else str(key)
        if key not in fields:
            quote = f" ({QUOTE_KEYS})" if _yaml_word(key) else ""
            raise ConfigError(f"unknown key {dotted!r}{suggest(str(key), fields)}{quote}")
        default = _field_default(fields[key])
        if isinstance(value, dict) and dataclasses.is_dataclass(default):
            # A partial section overrides the field's own default, which may differ from its
            # class's defaults (TextConfig.block has norm_eps 1e-5, BlockConfig 1e-6).
            value = _overlay(default, value)
        kwargs[key] = _convert(value, hints[key], dotted)
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{where or cls.__name__}: {err}") from None
    return obj


def _overlay(default: Any, value: dict[str, Any]) -> dict[str, Any]:
    """`value` over the dataclass instance `default`, as plain data: a nested dataclass
    section overlays its own default key by key; anything else given, a mapping such as
    `data.sources` included, replaces the default's value whole (a recipe's sources are its
    sources, not those plus the default synthetic `train`)."""
    out = {f.name: to_dict(getattr(default, f.name)) for f in dataclasses.fields(default)}
    for key, v in value.items():
        # a key that is not a string (YAML's `on:` is True) is refused by from_dict
        sub = getattr(default, key, None) if isinstance(key, str) else None
        nested = isinstance(v, dict) and dataclasses.is_dataclass(sub) and not isinstance(sub, type)
        out[key] = _overlay(sub, v) if nested else v
    return out


def _field_default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None if f.default is dataclasses.MISSING else f.default


def to_dict(obj: Any) -> Any:
    """A dataclass (nested) as plain JSON/YAML-ready data."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping that names one key twice (PyYAML would keep the last value silently)."""

    key: Any = None


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping.  A recipe that repeats a
    section (`train:` at the top and again at the bottom) would otherwise lose every setting
    of the first one without a word.  Keys brought in by a merge (`<<: *base`) may still be
    overridden: only the mapping's own keys are compared."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:  # an unhashable key: SafeLoader names it below
                continue
            if first is not key_node:
                err = DuplicateKeyError(
                    None,
                    None,
                    f"duplicate key {key!r}, first on line {first.start_mark.line + 1}",
                    key_node.start_mark,
                )
                err.key = key
                raise err
        return super().construct_mapping(node, deep=deep)

    def construct_ambiguous_number(self, node: yaml.ScalarNode) -> Any:
        """YAML 1.1's octal (`0400` -> 256), binary and base-60 (`1:40` -> 100) numbers stay
        text (a plain command-line value is kept as text by `_KEEP_TEXT`): a number field
        then refuses them by name."""
        if _YAML11_ONLY_NUMBER.fullmatch(str(node.value).strip()):
            return self.construct_scalar(node)
        if node.tag.endswith(":int"):
            return self.construct_yaml_int(node)
        return self.construct_yaml_float(node)


def strict_json(text: str) -> Any:
    """`json.loads` that refuses an object naming one key twice (ConfigError): json keeps the
    last value without a word, so a DeepSpeed or model JSON with `zero_optimization` twice ran
    the second one silently (recipes get the same check from `_StrictLoader`)."""

    def refuse_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise ConfigError(f"key {key!r} is given twice in one object")
            out[key] = value
        return out

    return json.loads(text, object_pairs_hook=refuse_repeats)


def read_json_config(path: str | os.PathLike[str], error: type[ConfigError] = ConfigError) -> Any:
    """A JSON config file a user writes (a DeepSpeed, model or exported config), read with
    `strict_json`; each problem (not UTF-8, not JSON, a key given twice) an `error` naming it."""
    try:
        return strict_json(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise error(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise error(f"{path}: not valid JSON ({err})") from None
    except ConfigError as err:
        raise error(f"{path}: {err}") from None


# numbers only YAML 1.1 reads so (octal 0400, binary 0b101, base 60 1:40); 0x hex is kept
_YAML11_ONLY_NUMBER = re.compile(
    r"[-+]?0[0-7_]+|[-+]?0b[01_]+|[-+]?\d[\d_]*(:[0-5]?\d)+(\.[\d_]*)?"
)
_StrictLoader.add_constructor("tag:yaml.org,2002:int", _StrictLoader.construct_ambiguous_number)
_StrictLoader.add_constructor("tag:yaml.org,2002:float", _StrictLoader.construct_ambiguous_number)


MAX_YAML_VALUES = 100_000  # far above any recipe; a "billion laughs" of aliases is not one


def load_yaml(text: str) -> Any:
    """yaml.safe_load, except that a key given twice in one mapping is a YAMLError
    (`DuplicateKeyError`) instead of the last value silently winning, and that data which
    expands to more than MAX_YAML_VALUES values is a ConfigError: aliases share one object
    when loaded, but every copy made later expands them (9 levels of 9 aliases: 9**9
    values, gigabytes and a traceback)."""
    data = yaml.load(text, Loader=_StrictLoader)  # safe: _StrictLoader is a SafeLoader
    # counted with a stack, not recursion: an alias inside its own anchor (`x: &a [*a]`)
    # makes a structure that contains itself, which expands without end
    todo, left = [data], MAX_YAML_VALUES
    while todo:
        node = todo.pop()
        left -= 1
        if left < 0:
            raise ConfigError(
                f"the YAML expands to more than {MAX_YAML_VALUES} values (aliases of aliases "
                "repeating a structure, or an alias inside its own anchor?)"
            )
        if isinstance(node, dict):
            todo.extend(node.keys())
            todo.extend(node.values())
        elif isinstance(node, list):
            todo.extend(node)
    return data


# values YAML 1.1 would read as something else: sexagesimal (12:30 -> 750), octal (010 -> 8),
# hex and binary ints, anchors/aliases/tags, and text with a comment (`a photo #3`)
_KEEP_TEXT = re.compile(r"\d+(:\d+)+|[-+]?0[0-7_]+|[-+]?0[xXoObB][0-9a-fA-F_]+|[&*!].*|.*\s#.*")


def parse_value(text: str) -> Any:
    """A command-line value parsed as YAML scalar or flow collection (`3e-4`, `true`, `[1,2]`);
    what YAML 1.1 would silently turn into another value stays text (a str field takes it,
    a number field rejects it by name)."""
    if text == "" or _KEEP_TEXT.fullmatch(text.strip()):
        return text
    try:
        value = load_yaml(text)
    except DuplicateKeyError as err:
        raise ConfigError(f"duplicate key {err.key!r} in {text!r}") from None
    except yaml.YAMLError:
        return text
    if isinstance(value, datetime.date):  # a run named 2024-06-01, not a datetime.date
        return text
    if isinstance(value, str) and _YAML11_FLOAT.fullmatch(text.strip()):
        return float(text)  # YAML 1.1 reads `3e-4` (no dot) as a string
    if isinstance(value, (dict, list)) and text.strip()[:1] not in ("{", "["):
        # block style is not a collection on the command line: a prompt such as
        # `a photo of the digit: 3` or `- draft` is text
        return text
    return value


def apply_overrides(
    data: dict[str, Any],
    overrides: typing.Iterable[str],
    keep_text: bool = False,
    schema: type | None = None,
) -> dict[str, Any]:
    """Apply `a.b.c=value` strings to nested dict `data` (a copy is returned).

    Only the shape is handled here; whether the key exists is checked when the result goes
    through `from_dict`, which names the full dotted key.  keep_text: a value that parses to
    a number, a boolean or null is kept as an `Override` with its text, for `from_dict` to
    give a str field the text (`name=42`); the result is then for `from_dict` only.
    schema: the dataclass `data` is for.  A mapping given to a section of it (`train={steps:
    5}`) merges into the section key by key, as the section of a YAML file overlays the
    defaults; without it the recipe's other keys of that section fell back to the defaults.
    A mapping given to any other field (`objectives={simclr: {}}`) replaces its value.
    """
    out = _copy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r} has an empty key part")
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if isinstance(child, Override):  # `a=null` then `a.b=1`: a section after all
                child = child.value
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(
                    f"override {key!r}: {'.'.join(parts[: i + 1])!r} is not a section"
                )
            node = child
        try:
            value = parse_value(raw)
        except ConfigError as err:
            raise ConfigError(f"override {key.strip()!r}: {err}") from None
        scalar = value is None or isinstance(value, (bool, int, float))
        if keep_text and scalar:
            value = Override(raw.strip(), value)
        elif isinstance(value, dict) and isinstance(node.get(parts[-1]), dict) and schema:
            section = _section(schema, parts)
            if section is not None:
                value = _merge_section(section, node[parts[-1]], value)
        node[parts[-1]] = value
    return out


def _merge_section(cls: type, base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """`update` over `base`, both data for dataclass `cls`: a section in both merges key by key,
    any other value of `update` (a mapping field such as `data.sources` too) replaces."""
    out = dict(base)
    for key, value in update.items():
        sub = _section(cls, [key]) if isinstance(key, str) else None
        if sub is not None and isinstance(value, dict) and isinstance(out.get(key), dict):
            value = _merge_section(sub, out[key], value)
        out[key] = value
    return out


def _section(cls: type, parts: list[str]) -> type | None:
    """The dataclass at dotted path `parts` of dataclass `cls` (through optional fields, the
    values of `dict[str, Section]` fields, and a mapping field whose metadata names the
    dataclass it holds: `field(metadata={"schema": X})`), or None where it is no section."""
    tp: Any = cls
    keyed = False  # the previous part was a dict field: this part is one of its keys
    for part in parts:
        if keyed:
            keyed = False
            continue
        if not (isinstance(tp, type) and dataclasses.is_dataclass(tp)):
            return None
        declared = {f.name: f for f in dataclasses.fields(tp)}
        if part in declared and "schema" in declared[part].metadata:
            tp = declared[part].metadata["schema"]
            continue
        hint = typing.get_type_hints(tp).get(part)
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(options) == 1:
            hint = options[0]  # Optional[X]
        if typing.get_origin(hint) is dict:
            hint, keyed = typing.get_args(hint)[1], True
        tp = hint
    return None if keyed or not isinstance(tp, type) or not dataclasses.is_dataclass(tp) else tp


def _copy(node: Any) -> Any:
    """A copy of plain data in which no two keys share a dict or list.  A YAML alias
    (`b: *a`) loads as the same object as its anchor, and copies that keep sharing
    (copy.deepcopy, a YAML round trip) let an override of `a.x` change `b.x` too."""
    if isinstance(node, dict):
        return {k: _copy(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_copy(v) for v in node]
    return node


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: `update` wins, nested mappings merge key by key."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out
