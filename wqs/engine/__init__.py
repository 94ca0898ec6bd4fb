"""The storage engine: on-device format, allocator, index, eviction, recovery, DRAM tier."""

from wqs.engine.engine import Engine, check_formattable, open_or_create
from wqs.engine.stats import EngineStats

__all__ = ["Engine", "EngineStats", "check_formattable", "open_or_create"]
