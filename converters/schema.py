"""Fill a dataclass from a JSON/YAML dict with type checks; the error names the place and the field."""
from __future__ import annotations

from dataclasses import MISSING, fields
from typing import Any, TypeVar

T = TypeVar("T")

_TYPE_NAMES: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "float": (int, float),
    "str": (str,),
    "bool": (bool,),
    "list": (list,),
    "tuple": (list, tuple),
    "dict": (dict,),
}


def allowed_types(annotation: str) -> tuple[type, ...]:
    """Python types a field annotated `annotation` (a string, see `from __future__ import annotations`)
    accepts; unknown names (nested dataclasses) allow dicts, which the caller builds."""
    allowed: tuple[type, ...] = ()
    for part in annotation.split("|"):
        name = part.strip().split("[")[0]
        allowed += _TYPE_NAMES.get(name, (dict,) if name[:1].isupper() else ())
    return allowed


def from_dict(
    cls: type[T], data: Any, where: str, error: type[Exception] = ValueError, strict: bool = False, **given: Any
) -> T:
    """Build dataclass `cls` from `data`. `given` fields are passed through unchecked. With `strict`,
    keys that are not fields are an error; otherwise they are ignored (real configs carry many)."""
    if not isinstance(data, dict):
        raise error(f"{where}: expected a mapping, got {type(data).__name__}")
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    if strict:
        unknown = sorted(set(data) - names)
        if unknown:
            raise error(f"{where}: unknown field {unknown[0]!r} (known: {sorted(names)})")
    kwargs: dict[str, Any] = dict(given)
    for f in fields(cls):  # type: ignore[arg-type]
        if f.name in given or not f.init:
            continue
        if data.get(f.name) is None:
            if f.default is MISSING and f.default_factory is MISSING:
                raise error(f"{where}: missing required field {f.name!r}")
            continue
        value = data[f.name]
        allowed = allowed_types(str(f.type))
        # bool is an int in Python: refuse True where a number is expected.
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            raise error(f"{where}: field {f.name!r} should be {f.type}, got {type(value).__name__} {value!r}")
        kwargs[f.name] = value
    return cls(**kwargs)
