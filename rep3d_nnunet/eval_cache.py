"""Tensors that eval-mode forwards derive from the weights (LRBM masks, kernel spectra), kept under one byte budget.

nnU-Net's predictor runs a network with unchanged weights on every tile and mirror flip of a case and reloads every
fold's weights before every case: keeping what depends only on the weights saves recomputing it per call. Three
rules keep that from ever changing a result or holding memory for good:

- An entry is served only while the tensors it was derived from hold the same contents: a snapshot is compared with
  ``torch.equal`` on every lookup. Version counters and data pointers would miss writes through ``.data`` (EMA code,
  weight surgery) and ``torch.nn.utils.vector_to_parameters``.
- Every entry counts its bytes (the value and the snapshot) against one process-wide budget,
  ``REP3D_EVAL_CACHE_MB`` (default 2048 MB: the kernel spectra of a Rep3D network on nnU-Net's default 128^3 plan
  take about 1.1 GB); storing beyond it evicts the least recently used entries, of any module.
- ``release()`` drops entries (of one owner, or all): ``train()`` does it for its module, and prediction code calls it
  when a model is done (``rep3d-nnunet predict``, our trainers after validation).
"""

from __future__ import annotations

import os
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Hashable, Sequence

import torch

DEFAULT_BUDGET_MB = 2048
BUDGET_VARIABLE = "REP3D_EVAL_CACHE_MB"


def budget_bytes() -> int:
    """The byte budget: ``REP3D_EVAL_CACHE_MB`` (megabytes, 0 disables caching) or the default.

    Raises:
        ValueError: the variable is not a non-negative number (the message names it and the fix).
    """
    value = os.environ.get(BUDGET_VARIABLE)
    if value is None or value.strip() == "":
        return DEFAULT_BUDGET_MB * 2 ** 20
    try:
        megabytes = float(value)
    except ValueError:
        megabytes = -1.0
    if not megabytes >= 0:
        raise ValueError(f"{BUDGET_VARIABLE}={value!r} is not a number of megabytes >= 0; set it to e.g. "
                         f"{DEFAULT_BUDGET_MB} (the default) or 0 to keep nothing.")
    return int(megabytes * 2 ** 20)


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    return 0


@dataclass
class _Entry:
    owner: weakref.ref
    kind: str
    condition: Hashable
    snapshot: list[torch.Tensor]
    value: Any
    nbytes: int


def _same_contents(snapshot: list[torch.Tensor], tensors: Sequence[torch.Tensor]) -> bool:
    if len(snapshot) != len(tensors) or any(a.shape != b.shape or a.dtype != b.dtype or a.device != b.device
                                            for a, b in zip(snapshot, tensors)):
        return False
    if not snapshot:
        return True
    if len({t.device for t in tensors}) > 1:
        return all(torch.equal(a, b) for a, b in zip(snapshot, tensors))
    # one comparison result read back, not one per tensor: a GPU synchronises once per lookup
    return bool(torch.stack([torch.eq(a, b).all() for a, b in zip(snapshot, tensors)]).all())


class EvalCache:
    """Entries keyed by (owner, kind, serial), least recently used first; see the module docstring."""

    def __init__(self):
        self._entries: OrderedDict[tuple[int, str, int], _Entry] = OrderedDict()
        self._serial = 0
        self._watched: set[int] = set()

    def lookup(self, owner: object, kind: str, tensors: Sequence[torch.Tensor], condition: Hashable = None):
        """The value stored for ``owner`` and ``kind`` under ``condition`` from tensors equal to ``tensors``, or None.

        Args:
            tensors: what the value was derived from (parameters, buffers), compared by content.
            condition: everything else the value depends on (input shape, dtype, autocast state...), compared by ==.
        """
        for key, entry in self._entries.items():
            if key[0] == id(owner) and key[1] == kind and entry.condition == condition \
                    and _same_contents(entry.snapshot, tensors):
                self._entries.move_to_end(key)
                return entry.value
        return None

    def store(self, owner: object, kind: str, tensors: Sequence[torch.Tensor], value: Any, condition: Hashable = None,
              per_owner: int = 1) -> Any:
        """Keeps ``value`` (at most ``per_owner`` entries of this owner and kind, the oldest dropped first) and evicts
        the least recently used entries of any owner beyond the budget; returns ``value``. A value larger than the
        whole budget is returned without being kept."""
        snapshot = [t.detach().clone() for t in tensors]
        nbytes = _nbytes(value) + _nbytes(snapshot)
        limit = budget_bytes()
        mine = [k for k in self._entries if k[0] == id(owner) and k[1] == kind]
        for key in mine[:max(0, len(mine) - per_owner + 1)]:
            del self._entries[key]
        if nbytes > limit:
            return value
        while self._entries and self.bytes_held() + nbytes > limit:
            self._entries.popitem(last=False)
        if id(owner) not in self._watched:  # entries die with their module (ids are reused after it is gone)
            self._watched.add(id(owner))
            weakref.finalize(owner, self._forget, id(owner))
        self._serial += 1
        self._entries[(id(owner), kind, self._serial)] = _Entry(weakref.ref(owner), kind, condition, snapshot,
                                                                value, nbytes)
        return value

    def discard(self, owner: object, kind: str) -> None:
        """Drops the entries of ``owner`` and ``kind`` (before a replacement is computed: never two at a time)."""
        for key in [k for k in self._entries if k[0] == id(owner) and k[1] == kind]:
            del self._entries[key]

    def _forget(self, owner_id: int) -> None:
        self._watched.discard(owner_id)
        for key in [k for k in self._entries if k[0] == owner_id]:
            del self._entries[key]

    def release(self, owner: object | None = None) -> None:
        """Drops the entries of ``owner`` (a module, or every module inside it), or all entries."""
        if owner is None:
            self._entries.clear()
            return
        owners = {id(m) for m in owner.modules()} if isinstance(owner, torch.nn.Module) else {id(owner)}
        for key in [k for k in self._entries if k[0] in owners]:
            del self._entries[key]

    def bytes_held(self, owner: object | None = None) -> int:
        """Bytes held by all entries (values and snapshots), or by those of ``owner`` and the modules inside it."""
        if owner is None:
            return sum(e.nbytes for e in self._entries.values())
        owners = {id(m) for m in owner.modules()} if isinstance(owner, torch.nn.Module) else {id(owner)}
        return sum(e.nbytes for k, e in self._entries.items() if k[0] in owners)


CACHE = EvalCache()
release = CACHE.release
bytes_held = CACHE.bytes_held
