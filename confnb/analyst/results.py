"""Released values, and how :func:`cn.export` finds the vault's record of them.

The vault keeps each released value under a result id (``r7``) so that an export can be signed over *the vault's
copy*, not over whatever the executor hands back. The executor therefore has to map a value the analyst holds back
to that id. The mapping is by identity, never by content or by ``DataFrame.attrs`` (which pandas copies onto every
derived frame): a frame computed *from* a released one is a different object and is not exportable as if it were
the released value. Identity is kept:

* for DataFrames, Series and numpy arrays, in a weak registry (the entry goes when the object does), together
  with a fingerprint taken at release, so a frame changed in place after release is refused rather than exported
  as something it no longer is;
* for scalars and dicts, by returning thin subclasses (:class:`ReleasedFloat`, :class:`ReleasedDict`, …) that carry
  the id; they behave as the builtin type, and arithmetic on them yields plain builtins, which are not exportable;
* for values no subclass can carry (``True``, ``None``), by the most recent release of that exact value.
"""

from __future__ import annotations

import hashlib
import json
import threading
import weakref
from typing import Any

__all__ = [
    "ReleasedDict",
    "ReleasedFloat",
    "ReleasedInt",
    "ReleasedList",
    "ReleasedStr",
    "remember",
    "result_id_of",
]


class _Released:
    """Mixin: the vault's result id of this value (set once, at release)."""

    confnb_result: str


class ReleasedInt(int, _Released):
    pass


class ReleasedFloat(float, _Released):
    pass


class ReleasedStr(str, _Released):
    pass


class _ReleasedContainer(_Released):
    """A mutable released value also keeps a digest of its content, to notice a change after release."""

    confnb_fingerprint: str

    def _seal_content(self) -> None:
        self.confnb_fingerprint = _json_digest(self)

    def _unchanged(self) -> bool:
        return _json_digest(self) == self.confnb_fingerprint


class ReleasedDict(dict[str, Any], _ReleasedContainer):
    pass


class ReleasedList(list[Any], _ReleasedContainer):
    pass


_WRAPPERS: dict[type, type[_Released]] = {
    int: ReleasedInt,
    float: ReleasedFloat,
    str: ReleasedStr,
    dict: ReleasedDict,
    list: ReleasedList,
}
_CHANGED = (
    "this value was changed after it was released; an export is signed over the released value itself, so release "
    "it again and export that"
)


class _Entry:
    __slots__ = ("fingerprint", "ref", "result")

    def __init__(self, ref: weakref.ref[Any], result: str, fingerprint: str | None) -> None:
        self.ref, self.result, self.fingerprint = ref, result, fingerprint


_lock = threading.Lock()
_registry: dict[int, _Entry] = {}
_by_value: dict[tuple[type, Any], str] = {}


def remember(value: Any, result_id: str) -> Any:
    """Record ``value`` as the vault's result ``result_id``; returns the value (a tagged subclass for builtins)."""
    wrapper = _WRAPPERS.get(type(value))
    if wrapper is not None:
        tagged = wrapper(value)  # type: ignore[call-arg]
        tagged.confnb_result = result_id
        if isinstance(tagged, _ReleasedContainer):
            tagged._seal_content()
        return tagged
    if _is_frame_like(value):
        _track(value, result_id, _fingerprint(value))
        return value
    try:
        with _lock:
            _by_value[(type(value), value)] = result_id
    except TypeError:
        pass  # unhashable and untrackable: such a value is not exportable, and export says so
    return value


def result_id_of(value: object) -> str:
    """The vault's result id of a value released in this kernel; a clear error for anything else."""
    if isinstance(value, _Released):
        if isinstance(value, _ReleasedContainer) and not value._unchanged():
            raise ValueError(_CHANGED)
        return value.confnb_result
    if _is_frame_like(value):
        with _lock:
            entry = _registry.get(id(value))
        if entry is not None and entry.ref() is value:
            if entry.fingerprint is not None and _fingerprint(value) != entry.fingerprint:
                raise ValueError(_CHANGED)
            return entry.result
    elif not isinstance(value, dict | list):
        try:
            with _lock:
                found = _by_value.get((type(value), value))
        except TypeError:
            found = None
        if found is not None:
            return found
    raise ValueError(
        f"this {type(value).__name__} was not released by this kernel: export the object that .release(), "
        "m.metrics(), m.params(), m.score() or m.predict() returned (a value computed from it is not a release)"
    )


def _track(value: Any, result_id: str, fingerprint: str | None) -> None:
    key = id(value)

    def forget(_: weakref.ref[Any]) -> None:
        with _lock:
            entry = _registry.get(key)
            if entry is not None and entry.ref() is None:
                del _registry[key]

    with _lock:
        _registry[key] = _Entry(weakref.ref(value, forget), result_id, fingerprint)


def _is_frame_like(value: object) -> bool:
    package = type(value).__module__.partition(".")[0]
    return package in ("pandas", "numpy") and hasattr(value, "shape")


def _fingerprint(value: Any) -> str | None:
    """A digest of a released frame's content, labels and dtypes (None when pandas cannot hash its cells)."""
    digest = hashlib.sha256()
    try:
        if type(value).__module__.startswith("numpy"):
            if value.dtype.kind == "O":
                digest.update(repr(value.tolist()).encode())
            else:
                digest.update(value.tobytes())
            digest.update(f"{value.dtype}{value.shape}".encode())
            return digest.hexdigest()
        import pandas as pd  # type: ignore[import-untyped]

        digest.update(pd.util.hash_pandas_object(value, index=True).to_numpy().tobytes())
        labels = [list(map(str, value.columns)), list(map(str, value.dtypes))] if value.ndim == 2 else [value.name]
        digest.update(repr([*labels, list(value.index.names), value.shape]).encode())
    except (TypeError, ValueError):
        return None
    return digest.hexdigest()


def _json_digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=repr).encode()).hexdigest()
