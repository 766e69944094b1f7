"""Typed configs on the command line: one helper turns a dataclass's fields into options and reads `FIELD=VALUE`
overrides, and one parser class makes every error a single line. Orchestrators take the dataclass, never an
argparse.Namespace.

    @dataclass(frozen=True)
    class StealConfig:
        url: str = option(help="the victim's base URL")            # no default: a required option
        budget: int = option(1000, "images to query at most")

    p = Parser(prog="astguard-steal"); add_options(p, StealConfig)
    cfg = from_args(StealConfig, p.parse_args(argv))
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import MISSING, Field, field, fields
from pathlib import Path
from typing import Any, Callable


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump), exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def option(default: Any = MISSING, help: str = "", *, parse: Callable[[str], Any] | None = None,
           choices: tuple | None = None, flag: str | None = None, metavar: str | None = None,
           append: bool = False, cli: bool = True, shown: str | None = None) -> Any:
    """A dataclass field that is also a command-line option. `parse` reads one value (default: by the field's
    type); `append` makes a repeatable option collecting a list; `cli=False` keeps the field off the command line;
    `shown` is the default as --help writes it, where the value itself would mislead."""
    meta = {"help": help, "parse": parse, "choices": choices, "flag": flag, "metavar": metavar, "append": append,
            "cli": cli, "shown": shown}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


def parse_bool(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(f"expected true or false, got {text!r}")
    return text.lower() in ("true", "1", "yes")


def parse_ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None


def parse_names(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    if not names:
        raise ValueError("expected a comma-separated list")
    return names


_BY_TYPE: dict[str, Callable[[str], Any]] = {
    "int": int, "float": float, "str": str, "bool": parse_bool, "Path": Path, "tuple[int, ...]": parse_ints,
    "list[str]": parse_names,
}


def type_name(f: Field) -> str:
    """The field's type as written, without `| None` (dataclasses keep annotations as strings here)."""
    text = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    return text.replace(" | None", "")


def _reader(f: Field) -> Callable[[str], Any]:
    parse = f.metadata.get("parse") or _BY_TYPE.get(type_name(f))
    if parse is None:
        raise TypeError(f"field {f.name}: no parser for type {f.type!r}; give option(parse=...)")
    return parse


def _argparse_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def read(text: str):
        try:
            return parse(text)
        except ValueError as e:  # argparse reports ArgumentTypeError's message as it is
            plain = parse in (int, float) or not str(e)  # int('x') says "invalid literal for int() with base 10"
            raise argparse.ArgumentTypeError(f"invalid {getattr(parse, '__name__', 'value')} value: {text!r}"
                                             if plain else str(e)) from None
    read.__name__ = getattr(parse, "__name__", "value")
    return read


def cli_fields(cls) -> list[Field]:
    return [f for f in fields(cls) if f.metadata.get("cli", True)]


def _default(f: Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def add_options(parser: argparse.ArgumentParser, cls, *, defer_defaults: bool = False,
                skip: tuple[str, ...] = ()) -> None:
    """One option per field of the dataclass `cls`: `--field-name`, typed by the field. A field without a default
    is a required option. `defer_defaults`: every option defaults to None and the help shows the dataclass's
    default, for configs whose defaults are layered (defaults <- preset <- options)."""
    for f in cli_fields(cls):
        if f.name in skip:
            continue
        m = f.metadata
        flag = m.get("flag") or "--" + f.name.replace("_", "-")
        default = _default(f)
        shown = m.get("shown") or ("" if default is MISSING or default is None or default == [] else _show(default))
        shown = f" (default: {shown})" if shown else ""
        kw: dict[str, Any] = {"help": (m.get("help") or "") + shown, "dest": f.name}
        if m.get("metavar"):
            kw["metavar"] = m["metavar"]
        if m.get("append"):
            parser.add_argument(flag, action="append", type=_argparse_type(_reader(f)),
                                default=None if defer_defaults else [], **kw)
            continue
        if default is MISSING:
            kw["required"] = True
        else:
            kw["default"] = None if defer_defaults else default
        if type_name(f) == "bool" and not m.get("parse"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
            continue
        parser.add_argument(flag, type=_argparse_type(_reader(f)), choices=m.get("choices"), **kw)


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) if value else "none"
    return str(value)


def from_args(cls, args: argparse.Namespace, **extra):
    """The dataclass from parsed options (None values of deferred defaults are left to the caller)."""
    return cls(**{f.name: getattr(args, f.name) for f in cli_fields(cls) if hasattr(args, f.name)}, **extra)


def given(cls, args: argparse.Namespace) -> dict[str, Any]:
    """The options of `cls` actually given (not None): the overrides of a deferred-defaults parser."""
    return {f.name: getattr(args, f.name) for f in cli_fields(cls) if getattr(args, f.name, None) is not None}


def parse_value(cls, name: str, text: str) -> Any:
    """`text` read as the field `name` of `cls` would be on the command line."""
    f = next((f for f in fields(cls) if f.name == name), None)
    if f is None:
        raise ValueError(f"unknown field {name!r}")
    try:
        return _reader(f)(text)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: cannot read {text!r} as {f.type}") from None


def parse_assignment(cls, text: str, *, option_name: str = "--set", forbidden: tuple[str, ...] = ()
                     ) -> tuple[str, Any]:
    """`FIELD=VALUE` -> (field, value) for a field of `cls` (dashes allowed in FIELD), not one of `forbidden`."""
    name, sep, value = text.partition("=")
    name = name.strip().replace("-", "_")
    if not sep or name not in {f.name for f in fields(cls)} or name in forbidden:
        other = f" other than {', '.join(forbidden)}" if forbidden else ""
        raise ValueError(f"{option_name} takes FIELD=VALUE with FIELD a training option{other}; got {text!r}")
    return name, parse_value(cls, name, value.strip())


OUR_PACKAGES = ("astguard", "training", "service", "clients", "evaluation")


def launch(prog: str, extra: str, load: Callable[[], Callable[[], int]]) -> int:
    """A console script's entry: `load()` imports the command's main and returns it. A third-party package that is
    not installed (the command's extra was not) is one line naming the extra, not a traceback."""
    try:
        main = load()
    except ModuleNotFoundError as e:
        if e.name is None or e.name.split(".")[0] in OUR_PACKAGES:
            raise
        print(f"{prog}: error: {e.name} is not installed; this command needs pip install 'astguard[{extra}]'",
              file=sys.stderr)
        return 2
    return main()
