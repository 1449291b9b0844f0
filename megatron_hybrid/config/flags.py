"""Command-line flags generated from typed dataclasses (``docs/design.md`` §6).

A settings dataclass declares each field with ``flag(...)`` (a flag) or ``derived(...)`` (set by
validation, never a flag). ``add_flags`` turns a group dataclass into an argparse argument group:
the flag is ``--field-name`` unless ``flags=`` names it (aliases included), its type comes from the
annotation (``int``, ``float``; ``str`` and ``list[str]`` are left to argparse), and every flag's
``--help`` line ends with its default (``HelpFormatter``).

Actions (``action=``):

- ``None``: ``--name VALUE`` (``nargs`` / ``choices`` as given);
- ``"store_true"``: a switch, default False;
- ``"bool_optional"``: ``--name`` / ``--no-name`` (argparse's ``BooleanOptionalAction``);
- ``"tristate"``: ``--name`` sets True and ``negative=`` (a second flag) sets False; None when
  neither is given (the model preset decides).
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

_HELP, _DERIVED = "help", "derived"


def flag(default: Any = dataclasses.MISSING, help: str = "", *, flags: tuple[str, ...] = (),
         action: str | None = None, negative: str | None = None, choices=None,
         nargs: str | None = None, default_text: str | None = None,
         negative_help: str | None = None) -> Any:
    """A dataclass field that is a command-line flag. No ``default``: a required flag.

    ``help`` is the flag's description (also the field's documentation); ``default_text``
    replaces the printed default where the raw value would mislead (None meaning "the preset's").
    """
    if not help:
        raise ValueError("flag(): every flag needs a help string")
    if action == "tristate" and negative is None:
        raise ValueError("flag(action='tristate') needs negative='--no-...'")
    meta = {_HELP: help, "flags": tuple(flags), "action": action, "negative": negative,
            "choices": choices, "nargs": nargs, "default_text": default_text,
            "negative_help": negative_help}
    if action == "store_true" and default is dataclasses.MISSING:
        default = False
    if action in ("tristate", "bool_optional") and default is dataclasses.MISSING:
        default = None
    return dataclasses.field(default=default, metadata=meta)


def derived(help: str) -> Any:
    """A dataclass field resolved by validation from the flags (not a flag itself; None before)."""
    return dataclasses.field(default=None, metadata={_HELP: help, _DERIVED: True})


def is_flag(f: dataclasses.Field) -> bool:
    """Whether the dataclass field ``f`` is a command-line flag (not a derived value)."""
    return _HELP in f.metadata and not f.metadata.get(_DERIVED)


def field_help(f: dataclasses.Field) -> str:
    """The field's documentation (its flag's help text)."""
    return f.metadata[_HELP]


def option_strings(f: dataclasses.Field) -> tuple[str, ...]:
    """The flags of field ``f``: ``flags=`` when given, else ``--field-name``."""
    return f.metadata["flags"] or ("--" + f.name.replace("_", "-"),)


def _value_type(hint) -> type | None:
    """argparse ``type=`` for a field annotation: int / float; None for str, list and bool."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    return hint if hint in (int, float) else None


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults formatter; ``(required)`` for required flags and a flag's
    ``default_text`` (set by ``add_flags``) instead of the raw default where one is given."""

    def _get_help_string(self, action):
        if action.required:
            return f"{action.help} (required)"
        text = getattr(action, "default_text", None)
        if text is not None and "%(default)" not in action.help:
            return f"{action.help} (default: {text})"
        return super()._get_help_string(action)


def add_flags(parser: argparse.ArgumentParser, title: str, cls) -> None:
    """Add an argument group ``title`` holding one flag per ``flag()`` field of dataclass ``cls``
    (dest = the field name)."""
    summary = " ".join((cls.__doc__ or "").split("\n\n")[0].split())  # first paragraph
    group = parser.add_argument_group(title, summary or None)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not is_flag(f):
            continue
        m, kw = f.metadata, {"dest": f.name, "help": _argparse_help(f)}
        action = m["action"]
        if action == "store_true":
            kw["action"] = "store_true"
        elif action == "bool_optional":
            kw.update(action=argparse.BooleanOptionalAction, default=f.default)
        elif action == "tristate":
            kw.update(action="store_true", default=f.default)
        else:
            if _value_type(hints[f.name]) is not None:
                kw["type"] = _value_type(hints[f.name])
            for key in ("choices", "nargs"):
                if m[key] is not None:
                    kw[key] = list(m[key]) if key == "choices" else m[key]
            if f.default is dataclasses.MISSING:
                kw.update(required=True, default=None)
            else:
                kw["default"] = f.default
        act = group.add_argument(*option_strings(f), **kw)
        act.default_text = m["default_text"]
        if action == "tristate":
            neg = group.add_argument(m["negative"], dest=f.name, action="store_false",
                                     help=m["negative_help"] or f"the opposite of "
                                     f"{option_strings(f)[0]}")
            neg.default_text = m["default_text"]


def _argparse_help(f: dataclasses.Field) -> str:
    """The help text as argparse reads it (``%`` doubled: argparse %-formats help strings)."""
    return field_help(f).replace("%", "%%")


def _markdown(text: str) -> str:
    """``text`` for a markdown table cell (``|`` and ``*`` escaped)."""
    return text.replace("|", "\\|").replace("*", "\\*")


def flag_table(groups) -> str:
    """Markdown reference of every flag of ``groups`` ((title, dataclass) pairs): flag, default,
    description; what ``docs/training.md`` shows (a test keeps the two equal)."""
    lines = []
    for title, cls in groups:
        rows = [f for f in dataclasses.fields(cls) if is_flag(f)]
        if not rows:
            continue
        lines += ["", f"**{title}**", "", "| flag | default | description |", "|---|---|---|"]
        for f in rows:
            names = " ".join(f"`{s}`" for s in option_strings(f))
            if f.metadata["negative"]:
                names += f" / `{f.metadata['negative']}`"
            if f.metadata["action"] == "bool_optional":
                names += f" / `--no-{option_strings(f)[0][2:]}`"
            if f.default is dataclasses.MISSING:
                default = "required"
            elif f.metadata["default_text"] is not None:
                default = _markdown(f.metadata["default_text"])
            else:
                default = f"`{f.default}`"
            text = _markdown(field_help(f))
            if f.metadata["choices"]:
                text += f" ({', '.join(f'`{c}`' for c in f.metadata['choices'])})"
            lines.append(f"| {names} | {default} | {text} |")
    return "\n".join(lines[1:]) + "\n"
