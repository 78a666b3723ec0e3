"""The KV block index."""

from epp.kvindex.index import KvIndex, Matches, Overlap

__all__ = ["KvIndex", "Matches", "Overlap"]
