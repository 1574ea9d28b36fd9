"""One module per actor kind; the public names are re-exported here."""

from lokid.actors.store import StoreActor, StoreStatistics

__all__ = ["StoreActor", "StoreStatistics"]
