"""The activation store: crash-safe sharded writing, shuffled streaming reads, statistics.

Layout and guarantees are described in docs/store.md.
"""

from difflens.store.format import COLUMNS, SCHEMA_VERSION
from difflens.store.reader import BatchStream, Store
from difflens.store.stats import SiteStats
from difflens.store.writer import StoreWriter

__all__ = ["COLUMNS", "SCHEMA_VERSION", "BatchStream", "SiteStats", "Store", "StoreWriter"]
