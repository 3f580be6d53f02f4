"""KVCompose for kvpress: structured KV cache compression with composite tokens and global layer allocation."""

from kvpress_compose.compose_decoding_press import ComposeDecodingPress
from kvpress_compose.compose_press import ComposePress
from kvpress_compose.compression import compute_n_kept
from kvpress_compose.query_sources import QUERY_SOURCES, QuerySource

__all__ = ["QUERY_SOURCES", "ComposeDecodingPress", "ComposePress", "QuerySource", "compute_n_kept"]
