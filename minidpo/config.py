"""
Typed configuration from dataclasses, with command-line overrides.

Every field of a dataclass is a flag: `beta: float = 0.1` becomes `--beta 0.1` (or `--beta=0.1`); underscores may
be written as dashes. A bool takes `--flag`, `--no-flag` or `--flag true|false`. `str | None` fields take `none`.
An unknown flag is rejected with the closest valid name; a value that does not parse as the field's type is rejected
naming the flag, the type and the value. Presets are plain dicts of overrides applied before the command line.

This replaces nanoGPT's exec()-based configurator: nothing from the command line is ever executed, and a typo fails
loudly instead of silently creating a new global.
"""

import ast
import dataclasses
import difflib
import inspect
import math
import types
import typing
from pathlib import Path
from typing import Any, Callable, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad flag or value; the message is meant to be shown to the user as is. `field` names the config field at
    fault (when known), so a program can map it to its own flag name; `detail` is the message without it."""

    def __init__(self, message: str, field: str | None = None, detail: str | None = None):
        super().__init__(message)
        self.field, self.detail = field, detail if detail is not None else message


def require(ok: bool, field: str, detail: str) -> None:
    """Raise ConfigError("<field> <detail>") unless ok. Components check their own config with this, e.g.
    `require(rank >= 1, "rank", f"must be >= 1, got {rank}")`; train.py re-labels `field` as its flag."""
    if not ok:
        raise ConfigError(f"{field} {detail}", field, detail)


def field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def parse_value(flag: str, raw: str, typ: Any) -> Any:
    """Convert the string `raw` to `typ` (bool, int, float, str, Optional[...] of those)."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if raw.lower() in ("none", "null") and len(args) < len(typing.get_args(typ)):
            return None
        if len(args) == 1:
            return parse_value(flag, raw, args[0])
    if typ is bool:
        low = raw.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"--{flag} expects true or false, got {raw!r}")
    if typ in (int, float):
        try:
            return typ(raw)
        except ValueError:
            raise ConfigError(f"--{flag} expects {'an integer' if typ is int else 'a number'}, got {raw!r}") from None
    if typ is str:
        return raw
    raise ConfigError(f"--{flag}: unsupported field type {typ}")


def parse_overrides(argv: list[str], types_by_name: dict[str, Any]) -> dict[str, Any]:
    """Turn ['--beta', '0.2', '--no-sft', ...] into {'beta': 0.2, 'sft': False, ...}."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument {arg!r}: options look like --name value")
        key, eq, raw = arg[2:].partition("=")
        name = key.replace("-", "_")
        negated = False
        if name not in types_by_name and name.startswith("no_") and types_by_name.get(name[3:]) is bool:
            name, negated = name[3:], True
        if name not in types_by_name:
            flags = [n.replace("_", "-") for n in types_by_name]
            match = difflib.get_close_matches(key.replace("_", "-"), flags, n=1, cutoff=0.5)
            raise ConfigError(f"unknown option --{key}" + (f"; did you mean --{match[0]}?" if match else ""))
        typ = types_by_name[name]
        flag = name.replace("_", "-")
        if negated:
            if eq:
                raise ConfigError(f"--no-{flag} takes no value")
            out[name] = False
        elif eq:
            out[name] = parse_value(flag, raw, typ)
        elif typ is bool and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            out[name] = True  # a bare boolean flag
        else:
            if i + 1 == len(argv):
                raise ConfigError(f"--{flag} needs a value")
            i += 1
            out[name] = parse_value(flag, argv[i], typ)
        i += 1
    return out


def build_config(cls: type[T], argv: list[str], presets: dict[str, dict[str, Any]] | None = None) -> T:
    """Defaults, then the preset named by --preset (if any), then every other flag, then cls.validate()."""
    overrides = parse_overrides(argv, field_types(cls))
    values: dict[str, Any] = {}
    if presets is not None and overrides.get("preset") is not None:
        name = overrides["preset"]
        if name not in presets:
            raise ConfigError(f"--preset must be one of {', '.join(presets)}, got {name!r}")
        values.update(presets[name])
    values.update(overrides)
    cfg = cls(**values)
    validate = getattr(cfg, "validate", None)
    if validate is not None:
        validate()
    return cfg


def field_comments(cls: type) -> dict[str, str]:
    """{field: the `# comment` after it in the class source}: the comment a reader sees next to a field is the help
    the user sees in --help, so the two cannot drift apart."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    names = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, str] = {}
    lines = source.splitlines()
    tree = ast.parse(inspect.cleandoc(source) if source[0].isspace() else source)
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    for node in body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id in names:
            line = lines[node.lineno - 1]
            if "#" in line:
                out[node.target.id] = line.split("#", 1)[1].strip()
    return out


def help_text(cls: type, doc: str = "", preset: tuple[str, dict[str, Any]] | None = None) -> str:
    """The options with their defaults and comments; under `preset` (its name and values) a value the preset sets
    is shown in place of the default, marked *, since that is what a run with it gets."""
    name, values = preset or ("", {})
    head = f"options (default in brackets; * --preset {name}'s value):" if preset else "options (default in brackets):"
    lines = [doc.strip(), "", head] if doc else [head]
    comments = field_comments(cls)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else "required"
        flag = f"--{f.name.replace('_', '-')} [{values[f.name]}]*" if f.name in values else \
            f"--{f.name.replace('_', '-')} [{default}]"
        note = comments.get(f.name, "")
        lines.append(f"  {flag:<34} {note}".rstrip() if len(flag) < 34 else f"  {flag}\n  {'':<34} {note}".rstrip())
    return "\n".join(lines)


def _matches_type(value: Any, typ: Any) -> bool:
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        return any(_matches_type(value, a) for a in typing.get_args(typ))
    if typ is type(None):
        return value is None
    if typ is bool:
        return isinstance(value, bool)
    if typ is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if typ is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, typ)


def config_from_dict(cls: type[T], stored: Any, source: str) -> T:
    """A config from a dict read back from disk (a run's config.json): an unknown key, a missing one or a value of
    the wrong type (`"steps": "16"`) is rejected naming `source` and the key, so a resumed run is the one started."""
    if not isinstance(stored, dict):
        raise ConfigError(f"{source}: expected a JSON object of settings, got {type(stored).__name__}")
    types_by_name = field_types(cls)
    unknown = sorted(set(stored) - set(types_by_name))
    if unknown:
        raise ConfigError(f"{source}: unknown setting {unknown[0]!r} (not written by this version of minidpo?)")
    for name, value in stored.items():
        if not _matches_type(value, types_by_name[name]):
            raise ConfigError(f"{source}: {name!r} must be {types_by_name[name]}, got {value!r}", name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{source}: {name!r} must be a finite number, got {value!r}", name)
    values = {k: float(v) if types_by_name[k] is float else v for k, v in stored.items()}
    return cls(**values)


def save_config(cfg: Any, path: Path) -> None:
    from minidpo.fileio import atomic_write_json
    atomic_write_json(path, dataclasses.asdict(cfg))


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def build_component(cls: type[T], flags: dict[str, str] | None = None, **values: Any) -> T:
    """cls(**values), with a ConfigError's field re-labelled as the program's flag: a component checks its own
    config (`require`) in its own words, and the user reads the flag they typed (`--lora-rank must be >= 1`)."""
    try:
        return cls(**values)
    except ConfigError as e:
        field = (flags or {}).get(e.field, e.field) if e.field else None
        if field is None:
            raise
        raise ConfigError(f"{flag_name(field)} {e.detail}", field) from None


def parse_list(field: str, raw: str | None, typ: type) -> list:
    """'0.1,0.5,1' -> [0.1, 0.5, 1.0] for a sweep option; a bad item is one message naming the option."""
    if raw is None:
        return []
    try:
        items = [typ(x) for x in raw.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{flag_name(field)} expects {typ.__name__}s separated by commas, got {raw!r}",
                          field) from None
    if not items:
        raise ConfigError(f"{flag_name(field)} is empty", field)
    return items


def preset_named(argv: list[str], presets: dict[str, dict[str, Any]] | None) -> tuple[str, dict[str, Any]] | None:
    """(name, its values and --preset's own) of the preset `--preset NAME` (or `--preset=NAME`) in argv names, if
    it names one."""
    for i, arg in enumerate(argv):
        name = argv[i + 1] if arg == "--preset" and i + 1 < len(argv) else \
            arg.partition("=")[2] if arg.startswith("--preset=") else None
        if presets and name in presets:
            return name, {"preset": name, **presets[name]}
    return None


def run_program(main: Callable[[list[str]], None], argv: list[str], doc: str, cls: type,
                presets: dict[str, dict[str, Any]] | None = None) -> int:
    """Run a program's main: --help prints the options (with the values of a --preset given beside it); an
    expected error (bad option, bad file, no network, a refused out-dir...) is ONE line `error: ...` on stderr and
    exit code 1, with no traceback (set MINIDPO_DEBUG=1 to see it). Only the programs exit; library code raises."""
    import os
    import sys
    if "-h" in argv or "--help" in argv:
        print(help_text(cls, doc, preset_named(argv, presets)))
        return 0
    try:
        main(argv)
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as e:
        expected = isinstance(e, (ValueError, OSError)) or type(e).__module__.startswith("minidpo")
        if os.environ.get("MINIDPO_DEBUG") or not expected:
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        if isinstance(e, OSError) and e.filename and str(e.filename) not in msg:
            msg = f"{e.filename}: {msg}"
        print(f"error: {msg}", file=sys.stderr)
        return 1
