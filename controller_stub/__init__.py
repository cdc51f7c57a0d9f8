"""The lightweight scheduler: a reservation ledger with admission control, its SQLite
store and the topology file (docs/CONTROL.md).  Sans-I/O core (``ledger``), I/O at the
edges (``store``, ``topology``); ``convert`` is the adapter to the generated gRPC
messages and is imported on its own (it needs grpcio), as are ``server`` (the gRPC
ControllerService, ``dxa controller serve``) and ``client`` (ControllerClient).
"""

from controller_stub.errors import *  # noqa: F403
from controller_stub.errors import __all__ as _errors_all
from controller_stub.ledger import *  # noqa: F403
from controller_stub.ledger import __all__ as _ledger_all
from controller_stub.store import LedgerStore
from controller_stub.topology import Topology, load_topology, parse_topology

__all__ = [*_ledger_all, *_errors_all, "LedgerStore", "Topology", "load_topology", "parse_topology"]
