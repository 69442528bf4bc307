"""`flowerdist rendezvous-store`: the rendezvous store of elastic training, in a process of its own.

torchrun's c10d rendezvous keeps its state in a TCP store. By default the agent on the node named by the endpoint
hosts it, so losing that node ends the whole job. Run this store on a machine that outlives the training nodes
(a login or service node) and start every node with `STORE=HOST:PORT bash launch/elastic.sh ...`: then any node,
the first one included, may be lost and the others restart at the smaller world size.

    flowerdist rendezvous-store --port 29400        # on the service node; runs until stopped
"""

from __future__ import annotations

import signal
import socket
import threading
from datetime import timedelta


def serve(host: str, port: int, stop: threading.Event | None = None) -> None:
    """Host a TCPStore on `host:port` until SIGTERM/SIGINT (or `stop` is set)."""
    from torch.distributed import TCPStore

    from flowerdist.errors import FlowerdistError

    stop = stop or threading.Event()
    try:
        store = TCPStore(host, port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60))
    except Exception as err:  # torch's message for a busy port is a C++ traceback
        raise FlowerdistError(f"cannot host the rendezvous store on {host}:{port} ({str(err).splitlines()[0][:120]}); "
                              f"choose a free port with --port") from None
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"flowerdist: rendezvous store on {socket.gethostname()}:{store.port}; start each node with "
          f"STORE={socket.gethostname()}:{store.port} bash launch/elastic.sh CONFIG ...", flush=True)
    stop.wait()
