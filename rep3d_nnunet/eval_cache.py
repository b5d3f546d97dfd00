"""Tensors that eval-mode forwards derive from the weights (LRBM masks, kernel spectra), kept under one byte budget.

nnU-Net's predictor runs a network with unchanged weights on every tile and mirror flip of a case and reloads every
fold's weights before every case: keeping what depends only on the weights saves recomputing it per call. Three
rules keep that from ever changing a result or holding memory for good:

- An entry is served only while the tensors it was derived from are the ones it was made from. The check reads
  host-side state only (no device synchronisation): each tensor's version counter (bumped by every in-place write
  autograd sees: ``load_state_dict``, optimizer steps, ``torch.no_grad()`` writes) and its storage (replaced by
  ``.to()``, ``vector_to_parameters``, assignments to ``.data``; held by a weak reference, so a freed address cannot
  come back under the same name). Only when one of them moved are the contents compared with the entry's snapshot
  (one read-back per lookup): nnU-Net's predictor reloads the same weights before every case and finds its entries
  again with one comparison per conv and fold, and every later tile and flip is served without one.
  The one write this cannot see: an in-place write through ``.data`` (``p.data.mul_(2)``) changes neither the
  version counter (``.data`` is an alias with a counter of its own) nor the storage, so no host-side state records
  it; call ``release(module)`` after such a write (``train()`` also does), or write under ``torch.no_grad()``.
- Every entry counts its bytes (the value and the snapshot) against one process-wide budget,
  ``REP3D_EVAL_CACHE_MB`` (default 2048 MB: the kernel spectra of a Rep3D network on nnU-Net's default 128^3 plan
  take about 1.1 GB). Beyond it a new entry is not kept, rather than evicting one the next convolution needs (least
  recently used eviction over the convolutions' cyclic order would evict every entry just before its next use and
  serve nothing); only entries left unused for a whole cycle of the convolution asking (since its previous miss:
  another network's, an old tile shape's) are evicted for it.
- ``release()`` drops entries (of one owner, or all): ``train()`` does it for its module, and prediction code calls it
  when a model is done (``rep3d-nnunet predict``, our trainers after validation).
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass
from typing import Any, Hashable, Sequence

import torch
from torch.multiprocessing.reductions import StorageWeakRef

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


class _Identity:
    """Host-side state of one tensor that any write autograd sees, or any new storage, changes (no device access)."""

    __slots__ = ("state", "storage")

    def __init__(self, tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        self.storage = StorageWeakRef(storage)  # while alive, its address names this storage and no other
        self.state = (tensor._version, storage._cdata, tensor.storage_offset(), tensor.shape, tensor.stride(),
                      tensor.dtype, tensor.device)

    def matches(self, tensor: torch.Tensor) -> bool:
        return tensor._version == self.state[0] and not self.storage.expired() and (
            tensor._version, tensor.untyped_storage()._cdata, tensor.storage_offset(), tensor.shape, tensor.stride(),
            tensor.dtype, tensor.device) == self.state


def _identities(tensors: Sequence[torch.Tensor]) -> list[_Identity] | None:
    """The tensors' identities, or None where one has no version counter (an inference tensor: content checks)."""
    if any(t.is_inference() for t in tensors):
        return None
    return [_Identity(t) for t in tensors]


def _same_layout(snapshot: Sequence[torch.Tensor], tensors: Sequence[torch.Tensor]) -> bool:
    return len(snapshot) == len(tensors) and all(a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
                                                 for a, b in zip(snapshot, tensors))


def _same_contents(snapshot: Sequence[torch.Tensor], tensors: Sequence[torch.Tensor]) -> bool:
    if not snapshot:
        return True
    if len({t.device for t in tensors}) > 1:
        return all(torch.equal(a, b) for a, b in zip(snapshot, tensors))
    # one comparison result read back, not one per tensor: a GPU synchronises once per lookup
    return bool(torch.stack([torch.eq(a, b).all() for a, b in zip(snapshot, tensors)]).all())


@dataclass
class _Entry:
    condition: Hashable
    identities: list[_Identity] | None  # of the tensors when the entry was last found valid
    snapshot: list[torch.Tensor]
    value: Any
    nbytes: int
    last_used: int

    def still_valid(self, tensors: Sequence[torch.Tensor]) -> bool:
        """True without reading the device when no tensor was written or replaced since the entry was last valid."""
        return self.identities is not None and len(self.identities) == len(tensors) and all(
            identity.matches(t) for identity, t in zip(self.identities, tensors))


class EvalCache:
    """Entries per (owner, kind), newest last; see the module docstring."""

    def __init__(self):
        self._entries: dict[tuple[int, str], list[_Entry]] = {}
        self._clock = 0  # counts lookups: when entries were last used
        self._misses: dict[tuple[int, str], tuple[int | None, int]] = {}  # (previous, last) miss of an owner, kind
        self._watched: set[int] = set()

    def lookup(self, owner: object, kind: str, tensors: Sequence[torch.Tensor], condition: Hashable = None):
        """The value stored for ``owner`` and ``kind`` under ``condition`` from the same ``tensors``, or None.

        Args:
            tensors: what the value was derived from (parameters, buffers): unchanged since the entry was stored or
                last found valid (host-side state, no device read), or else equal in content to its snapshot.
            condition: everything else the value depends on (input shape, dtype, autocast state...), compared by ==.
        """
        self._clock += 1
        key = (id(owner), kind)
        entries = self._entries.get(key, [])
        # entries of another device, dtype or shape (before a .to()) can never be served again
        entries[:] = [e for e in entries if _same_layout(e.snapshot, tensors)]
        candidates = [e for e in entries if e.condition == condition]
        found = next((e for e in candidates if e.still_valid(tensors)), None)
        if found is None:
            found = next((e for e in candidates if _same_contents(e.snapshot, tensors)), None)
            if found is not None:
                found.identities = _identities(tensors)  # the next lookups are served without a read-back
        if found is None:
            self._misses[key] = (self._misses.get(key, (None, None))[1], self._clock)
            return None
        found.last_used = self._clock
        return found.value

    def store(self, owner: object, kind: str, tensors: Sequence[torch.Tensor], value: Any, condition: Hashable = None,
              per_owner: int = 1) -> Any:
        """Keeps ``value`` if it fits the budget and returns it (kept or not).

        At most ``per_owner`` entries of this owner and kind are kept (the oldest dropped first). Beyond the budget
        only entries unused since this owner and kind's previous miss make room; a value that still does not fit is
        returned without being kept (and without copying its tensors).
        """
        key = (id(owner), kind)
        entries = self._entries.setdefault(key, [])
        del entries[:max(0, len(entries) - per_owner + 1)]
        nbytes = _nbytes(value) + _nbytes(list(tensors))
        limit = budget_bytes()
        if nbytes > limit:
            return value
        if self.bytes_held() + nbytes > limit:
            self._evict_unused_since(self._misses.get(key, (None, None))[0], limit - nbytes)
            if self.bytes_held() + nbytes > limit:
                return value
        if id(owner) not in self._watched:  # entries die with their module (ids are reused after it is gone)
            self._watched.add(id(owner))
            weakref.finalize(owner, self._forget, id(owner))
        snapshot = [t.detach().clone() for t in tensors]
        entries.append(_Entry(condition, _identities(tensors), snapshot, value, nbytes, self._clock))
        return value

    def _evict_unused_since(self, clock: int | None, target_bytes: int) -> None:
        """Drops entries last used before ``clock`` (least recently used first) until ``target_bytes`` are held, or
        none if dropping all of them would not get there."""
        if clock is None:
            return
        idle = sorted(((e.last_used, key, e) for key, entries in self._entries.items() for e in entries
                       if e.last_used < clock), key=lambda item: item[0])
        held = self.bytes_held()
        if held - sum(entry.nbytes for _, _, entry in idle) > target_bytes:
            return  # evicting them all would not make room: keep them
        for _, key, entry in idle:
            if held <= target_bytes:
                break
            self._entries[key].remove(entry)
            held -= entry.nbytes

    def discard(self, owner: object, kind: str) -> None:
        """Drops the entries of ``owner`` and ``kind`` (before a replacement is computed: never two at a time)."""
        self._entries.pop((id(owner), kind), None)

    def _forget(self, owner_id: int) -> None:
        self._watched.discard(owner_id)
        for key in [k for k in self._entries if k[0] == owner_id]:
            del self._entries[key]
        for key in [k for k in self._misses if k[0] == owner_id]:
            del self._misses[key]

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
            return sum(e.nbytes for entries in self._entries.values() for e in entries)
        owners = {id(m) for m in owner.modules()} if isinstance(owner, torch.nn.Module) else {id(owner)}
        return sum(e.nbytes for key, entries in self._entries.items() if key[0] in owners for e in entries)


CACHE = EvalCache()
release = CACHE.release
bytes_held = CACHE.bytes_held
