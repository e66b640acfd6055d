"""Options objects of the stage drivers, validated once from a declared table of constraints.

As scikit-learn's ``_parameter_constraints``: each options class declares, per field, what its values must
be; :class:`Options` checks them when the object is made, so a driver trusts what it is given and the
messages name the option as typed (``--batch-size 0 must be at least 1.``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

from pipeline.errors import UserError

OptionsType = TypeVar("OptionsType", bound="Options")


class Constraint(Protocol):
    """What a value must be; :meth:`problem` says what is wrong with one, in a sentence naming ``option``."""

    def problem(self, option: str, value: Any) -> str | None:
        ...


@dataclass(frozen=True)
class AtLeast:
    """A number no smaller than ``minimum``."""

    minimum: int

    def problem(self, option: str, value: Any) -> str | None:
        if _number(value) and value >= self.minimum:
            return None
        return f"{option} {value} must be at least {self.minimum}."


@dataclass(frozen=True)
class Fraction:
    """A share: at least 0 and below 1."""

    def problem(self, option: str, value: Any) -> str | None:
        if _number(value) and 0 <= value < 1:
            return None
        return f"{option} {value} must be at least 0 and below 1."


@dataclass(frozen=True)
class OneOf:
    """One of ``choices``."""

    choices: tuple[str, ...]

    def problem(self, option: str, value: Any) -> str | None:
        return None if value in self.choices else f"{option} {value} is not one of {', '.join(self.choices)}."


@dataclass(frozen=True)
class EachOneOf:
    """A sequence whose every item is one of ``choices`` (a ``noun`` each)."""

    choices: tuple[str, ...]
    noun: str

    def problem(self, option: str, value: Any) -> str | None:
        unknown = [item for item in value if item not in self.choices]
        if not unknown:
            return None
        return f"unknown {self.noun} {unknown[0]!r} in {option}; choose from: {', '.join(self.choices)}."


@dataclass(frozen=True)
class NotZero:
    """A count of parallel jobs: positive, or negative as joblib counts from the cores (-1: every core)."""

    def problem(self, option: str, value: Any) -> str | None:
        if isinstance(value, int) and value != 0:
            return None
        return f"{option} {value} runs nothing; use a positive number of parallel fits, or -1 for every core."


@dataclass(frozen=True)
class Suffix:
    """A path ending in one of ``suffixes``."""

    suffixes: tuple[str, ...]

    def problem(self, option: str, value: Any) -> str | None:
        if os.path.splitext(os.fspath(value))[1] in self.suffixes:
            return None
        return f"{option} {value} must end in {' or '.join(self.suffixes)}."


@dataclass(frozen=True)
class Options:
    """Base of the stages' options: a frozen dataclass checked against ``constraints`` when made.

    Subclasses declare ``constraints``, field name to a list of :class:`Constraint` (all must hold), with
    ``None`` in the list when None is allowed; ``flags`` names a field's command-line option where it is
    not ``--`` and the field's name with dashes.

    Raises
    ------
    UserError
        For the first field, in declaration order, whose value breaks a constraint.
    """

    constraints: ClassVar[Mapping[str, Sequence[Constraint | None]]] = {}
    flags: ClassVar[Mapping[str, str]] = {}

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            allowed = self.constraints.get(field.name)
            value = getattr(self, field.name)
            if isinstance(value, str) and "Path" in str(field.type):  # a path given as text, as Python callers do
                value = Path(value)
                object.__setattr__(self, field.name, value)
            if allowed is None or (value is None and None in allowed):
                continue
            option = self.flags.get(field.name, "--" + field.name.replace("_", "-"))
            for constraint in allowed:
                if constraint is not None and (problem := constraint.problem(option, value)):
                    raise UserError(problem)

    @classmethod
    def of(cls: type[OptionsType], options: OptionsType | None, settings: Mapping[str, Any]) -> OptionsType:
        """``options``, or one made from ``settings`` (some of the fields, by name) for a call that names a few.

        Raises
        ------
        TypeError
            Both given, or a setting that is not a field.
        """
        if options is not None and settings:
            raise TypeError(f"pass a {cls.__name__} or its fields by name, not both")
        if options is not None:
            return options
        unknown = set(settings) - {field.name for field in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(f"{cls.__name__} has no field {sorted(unknown)[0]!r}")
        return cls(**settings)


def _number(value: Any) -> bool:
    """An int or a float (a bool is neither here: ``--folds True`` is a mistake)."""
    return isinstance(value, int | float) and not isinstance(value, bool)
