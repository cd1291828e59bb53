"""``python -m deploy.topology up`` builds the topology and keeps it until
Ctrl-C (then tears it down); ``down`` removes whatever is left of one."""

from __future__ import annotations

import signal
import sys

from deploy.topology.topology import Topology, log, teardown


def main(argv: list[str]) -> int:
    if argv == ["down"]:
        try:
            teardown()
        except RuntimeError as e:
            print(f"not torn down: {e}", file=sys.stderr)
            return 1
        return 0
    if argv != ["up"]:
        print(__doc__, file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with Topology() as topo:
        log(f"ws: {topo.ws_url}  primary: {topo.primary_url}  OPS_TOKEN={topo.ops_token}; Ctrl-C tears it down")
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
