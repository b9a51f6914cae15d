"""The scheduler room: between the front doors (HTTP routes) and the engine.

Pages are admitted against a page queue and a KV token budget; at every decode step new
pages join the running batch and finished ones leave; deadlines, cancellation, failure
isolation and graceful shutdown live here. The engine knows nothing of queues; the API
knows nothing of batches.
"""

from .config import SchedulerConfig
from .loop import Scheduler
from .queue import PageQueue, PageRequest

__all__ = ["PageQueue", "PageRequest", "Scheduler", "SchedulerConfig"]
