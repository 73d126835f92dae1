"""YAML configs with command-line overrides, checked against a schema.

    hf-memlm train configs/tiny_cpu.yaml --training.learning_rate 1e-3 --model.memory.memory_type slot

The YAML file gives the values, `--dotted.key value` flags override them, and everything is checked
before any work starts: an unknown key is an error that names it (and suggests close matches), a value
of the wrong type is an error that names the key, the value and what was expected.

A schema is a tree of `Section`s whose leaves are `Option`s (a default, accepted types, a help line).
`DataclassSection` takes its keys and types from a dataclass (`TrainingArguments`, `MemLMConfig`,
`LoraConfig`), so every field of those classes can be set without repeating them here. `FreeSection`
accepts any key (e.g. a base model's config fields, checked by that config class itself).

Values are parsed as YAML (`true`, `null`, `[0, 1]`, `3`); strings in scientific notation such as `1e-3`
(which YAML 1.1 reads as text) become numbers where a number is expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import importlib
import inspect
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A config problem, worded for the person who wrote the config."""


_FLOAT_TEXT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


class _Loader(yaml.SafeLoader):
    """YAML 1.2-style scalars: only true/false are booleans (`eval_strategy: no` stays the text "no", not
    False as in YAML 1.1), and `1e-3` is a number."""


_Loader.yaml_implicit_resolvers = {
    first: [
        (tag, regexp) for tag, regexp in resolvers if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float")
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)"  # 1e-3, 2.5E4
        r"|[-+]?(?:\d+\.\d*|\.\d+)"  # 0.5, .5, 3.
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def _yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: no arbitrary objects


# -- schema --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Option:
    """A leaf: its default, the Python types it accepts (`None` allowed if `type(None)` is among them)."""

    default: object
    types: tuple = (object,)
    help: str = ""
    choices: tuple | None = None


@dataclass
class Section:
    """A group of keys (`{name: Option | Section}`)."""

    entries: dict
    help: str = ""

    def key_names(self) -> list[str]:
        return list(self.entries)

    def get(self, key: str):
        return self.entries.get(key)


@dataclass
class FreeSection:
    """A mapping whose keys are not checked here (the class consuming it checks them)."""

    help: str = ""


@dataclass
class DataclassSection:
    """Keys and types from a dataclass's init fields; `defaults` overrides the class defaults used here,
    `exclude` lists fields that must not be set in this section (with the reason).

    `cls` may be given as "module:ClassName" so that building the schema imports nothing heavy."""

    cls: type | str
    defaults: dict = field(default_factory=dict)
    exclude: dict = field(default_factory=dict)
    help: str = ""
    own_fields_only: bool = False  # only the fields the class itself declares (not those of its bases)

    def dataclass(self) -> type:
        if isinstance(self.cls, str):
            module, _, name = self.cls.partition(":")
            self.cls = getattr(importlib.import_module(module), name)
        return self.cls

    def fields(self) -> dict[str, object]:
        cls = self.dataclass()
        names = [f.name for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")]
        if self.own_fields_only:
            names = [name for name in names if name in inspect.get_annotations(cls)]
        return {name: _field_type(cls, name) for name in names if name not in self.exclude}

    def key_names(self) -> list[str]:
        return list(self.fields())


def _field_type(cls: type, name: str):
    """The annotation of field `name`, evaluated where it was declared; `object` (anything) if it cannot be."""
    for klass in cls.__mro__:
        annotation = inspect.get_annotations(klass).get(name)
        if annotation is None:
            continue
        if isinstance(annotation, str):
            module = importlib.import_module(klass.__module__)
            try:
                # what typing.get_type_hints does, one field at a time (other fields may not resolve)
                annotation = eval(annotation, vars(module))
            except (NameError, AttributeError, SyntaxError, TypeError):
                return object
        return annotation
    return object


# -- loading -------------------------------------------------------------------------------------------
def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping; a missing file or a file that is not a mapping is a `ConfigError`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist.")
    try:
        data = _yaml_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {error}") from error
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {str(path)!r} must hold a mapping of keys to values, got {type(data).__name__}."
        )
    return data


def parse_overrides(argv: list[str]) -> list[tuple[str, object]]:
    """`["--a.b", "1", "--c=x"]` -> `[("a.b", 1), ("c", "x")]`; values are parsed as YAML."""
    pairs, index = [], 0
    while index < len(argv):
        item = argv[index]
        if not item.startswith("--") or len(item) == 2:
            raise ConfigError(
                f"unexpected argument {item!r}: overrides are written --section.key value "
                "(e.g. --training.max_steps 10)."
            )
        key, has_value, text = item[2:].partition("=")
        if not has_value:
            if index + 1 >= len(argv) or (argv[index + 1].startswith("--") and len(argv[index + 1]) > 2):
                raise ConfigError(f"--{key} needs a value (e.g. --{key} VALUE).")
            text = argv[index + 1]
            index += 1
        index += 1
        key = key.replace("-", "_")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*", key):
            raise ConfigError(f"--{key}: keys are dotted names such as training.learning_rate.")
        try:
            value = _yaml_load(text) if text.strip() else text
        except yaml.YAMLError:
            value = text  # plain text that is not valid YAML, e.g. a path with a colon
        pairs.append((key, value))
    return pairs


def apply_overrides(config: dict, overrides: list[tuple[str, object]]) -> dict:
    """Set each dotted key in a copy of `config`, creating sub-mappings on the way."""
    result = _deep_copy(config)
    for key, value in overrides:
        node, parts = result, key.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise ConfigError(f"--{key}: {where} is a value ({child!r}), not a section with keys.")
            node = child
        node[parts[-1]] = value
    return result


def resolve(config: dict, schema: Section) -> dict:
    """Check `config` against `schema` and return it with defaults filled in and values coerced."""
    return _resolve_section(config, schema, prefix="", root=schema)


def load_config(path: str | Path, overrides: list[str] | None, schema: Section) -> dict:
    """YAML file + `--key value` flags, checked against `schema`."""
    config = apply_overrides(load_yaml(path), parse_overrides(overrides or []))
    return resolve(config, schema)


def dump_yaml(config: dict) -> str:
    return yaml.safe_dump(config, sort_keys=False, default_flow_style=None)


# -- checking ------------------------------------------------------------------------------------------
def _resolve_section(values, schema, prefix: str, root: Section) -> dict:
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'the config'} must be a mapping of keys, got {values!r}.")
    if isinstance(schema, FreeSection):
        return _deep_copy(values)
    if isinstance(schema, DataclassSection):
        return _resolve_dataclass(values, schema, prefix, root)
    result = {}
    for key, value in values.items():
        entry = schema.get(key) if isinstance(key, str) else None
        if entry is None:
            raise ConfigError(_unknown_key_message(prefix + str(key), schema.key_names(), root))
        if isinstance(entry, Option):
            result[key] = _check_option(prefix + key, value, entry)
        else:
            result[key] = _resolve_section(value, entry, prefix + key + ".", root)
    for key, entry in schema.entries.items():
        if key in result:
            continue
        if isinstance(entry, Option):
            result[key] = _deep_copy(entry.default)
        elif isinstance(entry, DataclassSection):
            result[key] = _deep_copy(entry.defaults)
        elif isinstance(entry, FreeSection):
            result[key] = {}
        else:
            result[key] = _resolve_section({}, entry, prefix + key + ".", root)
    return result


def _resolve_dataclass(values: dict, schema: DataclassSection, prefix: str, root: Section) -> dict:
    fields = schema.fields()
    result = _deep_copy(schema.defaults)
    for key, value in values.items():
        if key in schema.exclude:
            raise ConfigError(f"{prefix}{key} cannot be set here: {schema.exclude[key]}")
        if key not in fields:
            raise ConfigError(_unknown_key_message(prefix + str(key), list(fields), root))
        ok, coerced = _coerce(value, fields[key])
        if not ok:
            raise ConfigError(f"{prefix}{key}={value!r} is not valid: expected {_describe(fields[key])}.")
        result[key] = coerced
    return result


def _check_option(key: str, value, option: Option):
    annotation = typing.Union[option.types] if len(option.types) > 1 else option.types[0]  # noqa: UP007
    ok, coerced = _coerce(value, annotation)
    if not ok:
        raise ConfigError(f"{key}={value!r} is not valid: expected {_describe(annotation)}.")
    if option.choices is not None and coerced not in option.choices:
        raise ConfigError(f"{key}={value!r} is not valid: choose one of {', '.join(map(str, option.choices))}.")
    return coerced


def _coerce(value, annotation) -> tuple[bool, object]:
    """(does `value` fit `annotation`, the value converted where harmless: '1e-3' -> 0.001, 3 -> 3.0)."""
    if annotation is object or annotation is typing.Any:
        return True, value
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        args = typing.get_args(annotation)
        # prefer an exact fit (e.g. a string for `str | float`) before converting
        for arg in args:
            if _exact(value, arg):
                return True, value
        for arg in args:
            ok, coerced = _coerce(value, arg)
            if ok:
                return True, coerced
        return False, value
    if origin is typing.Literal:
        return value in typing.get_args(annotation), value
    if annotation is type(None):
        return value is None, value
    if annotation is bool:
        return isinstance(value, bool), value
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if annotation is float:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, (int, float)):
            return True, float(value)
        if isinstance(value, str) and _FLOAT_TEXT.match(value.strip()):
            return True, float(value)
        return False, value
    if annotation is str:
        return isinstance(value, str), value
    if origin in (list, tuple) or annotation in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False, value
        args = typing.get_args(annotation)
        if not args or args[-1] is Ellipsis or origin is tuple:
            return True, list(value)
        converted = []
        for item in value:
            ok, item = _coerce(item, args[0])
            if not ok:
                return False, value
            converted.append(item)
        return True, converted
    if origin is dict or annotation is dict:
        return isinstance(value, dict), value
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        allowed = [member.value for member in annotation]
        return (value in allowed or isinstance(value, annotation)), value
    if isinstance(annotation, type):
        # any other class (a config object, ...): accept an instance, or a mapping/text its owner parses
        return isinstance(value, (annotation, dict, str)), value
    return True, value


def _exact(value, annotation) -> bool:
    if annotation is type(None):
        return value is None
    if annotation in (bool, int, float, str):
        return type(value) is annotation
    return False


def _describe(annotation) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        return " or ".join(dict.fromkeys(_describe(arg) for arg in typing.get_args(annotation)))
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(annotation)))
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "one of " + ", ".join(repr(member.value) for member in annotation)
    names = {
        type(None): "null",
        bool: "true/false",
        int: "an integer",
        float: "a number",
        str: "text",
        list: "a list",
        tuple: "a list",
        dict: "a mapping",
    }
    if annotation in names:
        return names[annotation]
    if origin in (list, tuple):
        args = typing.get_args(annotation)
        return f"a list of {_describe(args[0])}" if args else "a list"
    if origin is dict:
        return "a mapping"
    return getattr(annotation, "__name__", str(annotation))


def _unknown_key_message(key: str, section_keys: list[str], root: Section) -> str:
    section, _, name = key.rpartition(".")
    where = f"in section '{section}'" if section else "at the top level"
    message = f"unknown config key '{key}' ({where})."
    close = difflib.get_close_matches(name, section_keys, n=3, cutoff=0.6)
    if close:
        suggestions = [f"{section}.{c}" if section else c for c in close]
    else:
        # the key may simply be in another section (e.g. --learning_rate for --training.learning_rate)
        everywhere = _all_keys(root)
        suggestions = [path for path in everywhere if path.rsplit(".", 1)[-1] == name]
        suggestions = suggestions or difflib.get_close_matches(key, everywhere, n=3, cutoff=0.75)
    if suggestions:
        message += " Did you mean " + " or ".join(f"'{s}'" for s in suggestions) + "?"
    elif section_keys:
        message += f" Valid keys here: {', '.join(sorted(section_keys)[:40])}."
    return message


def _all_keys(schema, prefix: str = "") -> list[str]:
    keys = []
    entries = schema.entries.items() if isinstance(schema, Section) else []
    for key, entry in entries:
        if isinstance(entry, Section):
            keys.extend(_all_keys(entry, prefix + key + "."))
        elif isinstance(entry, DataclassSection):
            keys.extend(prefix + key + "." + name for name in entry.key_names())
        else:
            keys.append(prefix + key)
    return keys


def _deep_copy(value):
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


def describe_schema(schema: Section, prefix: str = "") -> str:
    """Help text listing every key of a schema with its default and help line (`--help`)."""
    lines = []
    for key, entry in schema.entries.items():
        name = prefix + key
        if isinstance(entry, Option):
            lines.append(f"  {name} (default {entry.default!r}){': ' + entry.help if entry.help else ''}")
        elif isinstance(entry, Section):
            lines.append(describe_schema(entry, name + "."))
        else:
            lines.append(f"  {name}.*{': ' + entry.help if entry.help else ''}")
    return "\n".join(lines)


__all__ = [
    "ConfigError",
    "DataclassSection",
    "FreeSection",
    "Option",
    "Section",
    "apply_overrides",
    "describe_schema",
    "dump_yaml",
    "load_config",
    "load_yaml",
    "parse_overrides",
    "resolve",
]
