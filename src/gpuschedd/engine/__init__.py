"""The model table and its state machine, split by concern (docs/architecture.md lists the modules).

running → freezing → frozen → thawing → running; stopped and failed end a model's life (model.TRANSITIONS). Every
transition of one model holds that model's lock (never two at once, so opposite swaps cannot deadlock); readers
never take a lock, so status stays instant during a long freeze. The engine knows no D-Bus: it is driven by the
bus layer (or tests) and reports through listeners.
"""

from __future__ import annotations

from .adoption import Adoption
from .budget import Budget
from .catalog import Catalog
from .core import DAEMON, Requester
from .freeze import Freezing
from .lifecycle import Lifecycle
from .paging import Paging
from .parking import Parking
from .policies import Policies_
from .startup import Startup
from .thaw import Thawing

__all__ = ["DAEMON", "Engine", "Requester"]


class Engine(Startup, Lifecycle, Adoption, Freezing, Thawing, Parking, Paging, Budget, Policies_, Catalog):
    """The facade the daemon and the bus drive."""
