"""Worker processes: one server on every core (see `supervisor` for the model).

Server(config, workers=4)              # in a composition root; serve() supervises
python -m framework serve MODULE:FACTORY --workers 4
"""

from framework.workers.slot import WorkerSlot

__all__ = ["WorkerSlot"]
