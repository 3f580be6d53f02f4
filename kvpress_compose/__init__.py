"""KVCompose for kvpress: structured KV cache compression with composite tokens and global layer allocation."""

from kvpress_compose.allocation import compute_n_kept
from kvpress_compose.compose_press import QUERY_SOURCES, ComposePress

__all__ = ["QUERY_SOURCES", "ComposePress", "compute_n_kept"]
