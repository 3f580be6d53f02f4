"""The one causal visibility rule, shared by scoring (softmax and log-sum-exp paths) and the per-layer masks."""

from __future__ import annotations

import torch


def causally_visible(queries: range, keys: range, causal_offset: int | None, device=None) -> torch.Tensor:
    """``(len(queries), len(keys))`` booleans: query ``q`` sees key ``j`` iff ``j <= q + causal_offset``
    (``causal_offset=None``: every key). Padding is the caller's to add."""
    if causal_offset is None:
        return torch.ones(len(queries), len(keys), dtype=torch.bool, device=device)
    query_index = torch.arange(queries.start, queries.stop, device=device)[:, None]
    key_index = torch.arange(keys.start, keys.stop, device=device)[None, :]
    return key_index <= query_index + causal_offset
