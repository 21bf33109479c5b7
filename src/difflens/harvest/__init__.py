"""Harvesting: run prompts through a model adapter with recording hooks and write an activation store."""

from difflens.harvest.config import HarvestConfig
from difflens.harvest.run import harvest

__all__ = ["HarvestConfig", "harvest"]
