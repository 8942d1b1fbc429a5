"""Process-wide config state: the ``--allow-any-target`` trust setting and which YAML file a loaded config came from."""

from __future__ import annotations

import contextvars
import re
import weakref
from pathlib import Path

from omegaconf import DictConfig, ListConfig

_ALLOW_ANY_TARGET: contextvars.ContextVar[bool] = contextvars.ContextVar("mmtrain_allow_any_target", default=False)

# id(root config) -> (weak reference to it, the primary YAML file): lets instantiate() name the file in errors.
_SOURCES: dict[int, tuple[weakref.ref, Path]] = {}


def set_allow_any_target(allow: bool) -> None:
    """Trust (True) or not (False) ``_target_`` paths outside the allowlist for later ``instantiate`` calls."""
    _ALLOW_ANY_TARGET.set(bool(allow))


def allow_any_target() -> bool:
    return _ALLOW_ANY_TARGET.get()


def one_line(text: object) -> str:
    """Collapse a (possibly multi-line) message to one line."""
    return re.sub(r"\s*\n\s*", "; ", str(text).strip())


def remember_source(cfg: DictConfig, path: Path) -> None:
    key = id(cfg)
    _SOURCES[key] = (weakref.ref(cfg, lambda _ref, key=key: _SOURCES.pop(key, None)), path)


def source_of(node) -> Path | None:
    """The YAML file a config returned by ``load`` came from (None for configs built in code)."""
    root = node._get_root() if isinstance(node, (DictConfig, ListConfig)) else None
    entry = _SOURCES.get(id(root)) if root is not None else None
    if entry is None or entry[0]() is not root:
        return None
    return entry[1]
