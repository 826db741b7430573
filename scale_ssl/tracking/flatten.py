"""Flatten nested configuration into the flat ``key -> value`` form MLflow params need.

MLflow stores params as a flat string map, so ``{"trainer": {"max_steps": 100}}`` is logged as
``trainer.max_steps = "100"``. Lists and tuples are kept whole (``"[0.5, 0.5]"``): their position
is not a name, and a config's list reads better as one value than as ``crop.0``, ``crop.1``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any


def flatten_dict(config: Mapping[str, Any], sep: str = ".", prefix: str = "") -> dict[str, Any]:
    """Return ``config`` with nested mappings (and dataclass instances) joined into dotted keys.

    ``{"a": {"b": 1, "c": {"d": 2}}, "e": 3}`` becomes ``{"a.b": 1, "a.c.d": 2, "e": 3}``.
    An empty nested mapping is kept as the value ``{}`` so its key stays visible. Values are not
    converted; the caller decides how to stringify them.

    Raises ``ValueError`` if two paths flatten to the same key (``{"a.b": 1, "a": {"b": 2}}``),
    since one of the two values would otherwise be dropped silently.
    """
    if not isinstance(config, Mapping) and not _is_dataclass_instance(config):
        raise TypeError(
            f"flatten_dict: config must be a mapping (dict, OmegaConf DictConfig) or a dataclass "
            f"instance, got {type(config).__name__}; convert it with dict(...) or vars(...) first"
        )
    flat: dict[str, Any] = {}
    _flatten_into(flat, _as_mapping(config), sep, prefix)
    return flat


def _flatten_into(flat: dict[str, Any], node: Mapping, sep: str, prefix: str) -> None:
    for key, value in node.items():
        full_key = f"{prefix}{sep}{key}" if prefix else str(key)
        if _is_dataclass_instance(value) or (isinstance(value, Mapping) and len(value) > 0):
            _flatten_into(flat, _as_mapping(value), sep, full_key)
            continue
        if full_key in flat:
            raise ValueError(
                f"flatten_dict: the key {full_key!r} occurs twice once nested keys are joined "
                f"with {sep!r}; rename one of them in the config"
            )
        flat[full_key] = dict(value) if isinstance(value, Mapping) else value


def _as_mapping(node: Any) -> Mapping:
    # Shallow on purpose: ``dataclasses.asdict`` would deep-copy every field value.
    if _is_dataclass_instance(node):
        return {field.name: getattr(node, field.name) for field in dataclasses.fields(node)}
    return node


def _is_dataclass_instance(value: Any) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)
