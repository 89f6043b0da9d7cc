"""Options declared once: a dataclass field carries its command-line flag, help, choices and parser.

Every setting of a port is a field of :class:`~loraport.port.TransferOptions` or of one of its
method groups (:class:`~loraport.calibrate.CalibrationOptions`, ...), declared with
:func:`option`. The ``transfer`` command's flags, the ``loraport batch`` manifest's keys, the
keyword names of :func:`loraport.transfer` and the report's option record are all derived
from those declarations (:mod:`loraport.port.options`), so a new option is written once, in
the group of the method it belongs to.

Example::

    @dataclass
    class MyOptions:
        steps: int = option(100, flag="my_steps", help="training steps", metavar="N", word=int)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import MISSING, dataclass
from typing import Any

from .errors import TransferError

OPTION = "loraport_option"


@dataclass(frozen=True)
class OptionSpec:
    """How one option is spelled outside Python.

    Attributes:
        name: the keyword of :func:`loraport.transfer` (``calib_rank``); ``None``: the field's name.
        flag: the command-line flag with underscores (``calib_rank`` -> ``--calib-rank``), also the
            batch manifest key; ``None``: settable from Python only.
        help: the flag's help text.
        group: the concern it belongs to (``method``, ``subspace``, ``threshold``, ``output``,
            ``run``); a method group's fields take the group's title instead.
        choices: the allowed values (a callable is asked when the parser is built).
        metavar: the flag's value name in help texts.
        word: turns the command-line word into the value (``int``, ``float``); ``None``: the
            word as written, and a non-string default is spelled as a word too.
        convert: turns the parsed word into the field's value (may raise ``LoraportError``
            with a one-line message); ``None``: the parsed word.
        switch: a flag without a value, which sets the field to the opposite of its default.
    """

    name: str | None = None
    flag: str | None = None
    help: str = ""
    group: str | None = None
    choices: tuple[str, ...] | Callable[[], tuple[str, ...]] | None = None
    metavar: str | None = None
    word: Callable[[str], Any] | None = None
    convert: Callable[[Any], Any] | None = None
    switch: bool = False

    def allowed(self) -> tuple[str, ...] | None:
        return self.choices() if callable(self.choices) else self.choices


def option(
    default: Any = MISSING,
    *,
    default_factory: Callable[[], Any] | Any = MISSING,
    help: str = "",
    flag: str | None = None,
    name: str | None = None,
    group: str | None = None,
    choices: tuple[str, ...] | Callable[[], tuple[str, ...]] | None = None,
    metavar: str | None = None,
    word: Callable[[str], Any] | None = None,
    convert: Callable[[Any], Any] | None = None,
    switch: bool = False,
) -> Any:
    """A dataclass field declared as an option (see :class:`OptionSpec` for the arguments)."""
    spec = OptionSpec(name, flag, help, group, choices, metavar, word, convert, switch)
    return dataclasses.field(default=default, default_factory=default_factory, metadata={OPTION: spec})


def option_spec(field: dataclasses.Field[Any]) -> OptionSpec | None:
    """The declaration of a field, or ``None`` for a plain field."""
    return field.metadata.get(OPTION)


def declared(cls: type) -> Iterator[tuple[dataclasses.Field[Any], OptionSpec]]:
    """The fields of dataclass ``cls`` that are declared options, in declaration order."""
    for field in dataclasses.fields(cls):
        spec = option_spec(field)
        if spec is not None:
            yield field, spec


def default_of(field: dataclasses.Field[Any]) -> Any:
    """The field's default value (a fresh one for ``default_factory`` fields)."""
    if field.default is not MISSING:
        return field.default
    if field.default_factory is not MISSING:
        return field.default_factory()
    raise ValueError(f"option {field.name} has no default")


def keyword_fields(cls: type) -> dict[str, str]:
    """``transfer()`` keyword names -> field names of an option group, whose every field must be declared."""
    names = {spec.name or f.name: f.name for f, spec in declared(cls)}
    if len(names) != len(dataclasses.fields(cls)):
        raise TypeError(f"every field of {cls.__name__} must be declared with option()")
    return names


def check_choices(options: Any, only: tuple[str, ...] | None = None) -> None:
    """Raise ``TransferError`` for the first declared field whose value is not among its choices.

    ``None`` passes (an unset option); ``only``: these field names (default: every field with
    choices). The message names the option as the user spelled it: its flag, else its keyword.
    """
    for field, spec in declared(type(options)):
        allowed = spec.allowed()
        if allowed is None or (only is not None and field.name not in only):
            continue
        value = getattr(options, field.name)
        if value is not None and value not in allowed:
            spelled = "--" + spec.flag.replace("_", "-") if spec.flag else (spec.name or field.name)
            raise TransferError(f"{spelled} must be one of {', '.join(allowed)}, got {value!r}")


def add_option_argument(target: Any, field: dataclasses.Field[Any], spec: OptionSpec, dest: str) -> None:
    """Add the command-line flag of one declared option to an ``argparse`` parser or group."""
    flag = "--" + str(spec.flag).replace("_", "-")
    default = default_of(field)
    if spec.switch:
        target.add_argument(flag, dest=dest, action="store_false" if default else "store_true", help=spec.help)
        return
    if spec.convert is not None:
        default = None  # not given: the field keeps its default
    elif spec.word is None and default is not None and not isinstance(default, str):
        default = str(default)  # a word as written: its default is spelled as a word too
    kwargs: dict[str, Any] = {"dest": dest, "default": default, "help": spec.help}
    if spec.word is not None:
        kwargs["type"] = spec.word
    if spec.allowed() is not None:
        kwargs["choices"] = list(spec.allowed() or ())
    if spec.metavar is not None:
        kwargs["metavar"] = spec.metavar
    target.add_argument(flag, **kwargs)


def add_group_arguments(parser: Any, cls: type, title: str, skip: tuple[str, ...] = (), prefix: str = "") -> None:
    """Add the flags of every declared option of group ``cls`` (but ``skip``, by field name) under ``title``."""
    group = parser.add_argument_group(title)
    for field, spec in declared(cls):
        if spec.flag is not None and field.name not in skip:
            add_option_argument(group, field, spec, prefix + field.name)


def group_from_args(args: Any, cls: type, skip: tuple[str, ...] = (), prefix: str = "") -> Any:
    """An instance of group ``cls`` from parsed flags added by :func:`add_group_arguments`."""
    options = cls()
    for field, spec in declared(cls):
        dest = prefix + field.name
        if spec.flag is None or field.name in skip or not hasattr(args, dest):
            continue
        value = getattr(args, dest)
        if spec.convert is not None:
            if value is None:
                continue
            value = spec.convert(value)
        setattr(options, field.name, value)
    return options


__all__ = [
    "OPTION",
    "OptionSpec",
    "add_group_arguments",
    "add_option_argument",
    "check_choices",
    "declared",
    "default_of",
    "group_from_args",
    "keyword_fields",
    "option",
    "option_spec",
]
