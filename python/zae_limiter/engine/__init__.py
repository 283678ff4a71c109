"""The engine: decide → write → retry → give back for any set of bucket targets (`Engine`),
local reservations of tokens (`Reserver`), the expiry of bucket items and the reading of stored
states written under another definition. It uses the core, storage's interface and the domain,
never an implementation of storage."""

from .engine import Engine, Landing, Target
from .reservations import Reserver

__all__ = ["Engine", "Landing", "Reserver", "Target"]
