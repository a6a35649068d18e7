"""Bytes held by a generation cache, counted from the tensors the cache object actually references.

Works for any cache structure without knowing its class: Hugging Face ``Cache`` objects
(``DynamicCache.layers[i].keys / .values`` and the sliding-window layers), legacy tuples of
``(key, value)`` pairs, and hf_attn's own cache, whose layers keep keys/values or a low-rank state.
The walk follows attributes, lists, tuples and dicts and counts each distinct *storage* once, by
its full size: a cache that keeps a small slice of a large tensor holds the whole tensor alive, and
that is what the count shows.
"""

from __future__ import annotations

from typing import Any

import torch

# Objects the walk never descends into: modules (weights are not cache), configs, and types.
_SKIP_TYPES: tuple[type, ...] = (torch.nn.Module, type)


def cache_tensors(cache: Any) -> list[torch.Tensor]:
    """Every tensor reachable from ``cache`` through attributes and containers, each object once."""
    found: list[torch.Tensor] = []
    seen: set[int] = set()
    stack = [cache]
    while stack:
        obj = stack.pop()
        if obj is None or id(obj) in seen or isinstance(obj, (str, bytes, int, float, bool)):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            found.append(obj)
        elif isinstance(obj, _SKIP_TYPES) or type(obj).__name__.endswith("Config"):
            continue
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif hasattr(obj, "__dict__"):
            stack.extend(vars(obj).values())
        elif hasattr(obj, "__slots__"):
            stack.extend(getattr(obj, slot, None) for slot in obj.__slots__)
    return found


def cache_nbytes(cache: Any) -> int:
    """Bytes of the distinct tensor storages held by ``cache`` (0 for ``None``)."""
    storages: dict[int, int] = {}
    for tensor in cache_tensors(cache):
        if tensor.device.type == "meta":
            continue
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
    return sum(storages.values())
