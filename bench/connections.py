"""The controller's memory for SSH connections: with the limit on open connections
(rollout.transport.CONNECTIONS) and without it, over a real sshd.

    .venv/bin/python bench/connections.py [--nodes 600] [--step 100]

Uses `--nodes` transports one after the other against a throwaway sshd (tests/sshd_fixture.py;
root, a network namespace), each running one command, as a rollout's status phase does over a
fleet. Every `--step` nodes it prints the connections open, the threads and the resident memory
gained since the start. Each case runs in a child process of its own, so one's memory does not
show in the other's. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.scale import status_kib  # noqa: E402
from rollout.transport import CONNECTIONS, SSHTransport  # noqa: E402
from tests.sshd_fixture import throwaway_sshd  # noqa: E402


def one_case(nodes: int, step: int, limit: int | None) -> None:
    CONNECTIONS.limit = sys.maxsize if limit is None else limit
    label = "no limit" if limit is None else f"limit {limit}"
    with throwaway_sshd() as server:
        warm = SSHTransport(server.node)
        warm.run(["true"], check=True)
        warm.close()
        gc.collect()
        before = status_kib("VmRSS")
        transports = [SSHTransport(server.node) for _ in range(nodes)]
        try:
            for i, t in enumerate(transports, 1):
                t.run(["true"], check=True)
                if i % step == 0 or i == nodes:
                    gc.collect()
                    gained = status_kib("VmRSS") - before
                    print(f"{label:>10}: {i:5d} nodes reached, {len(CONNECTIONS):5d} open, "
                          f"{threading.active_count():5d} threads, +{gained / 1024:6.1f} MiB "
                          f"({gained / i:5.1f} KiB per node)", flush=True)
        finally:
            for t in transports:
                t.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=600)
    p.add_argument("--step", type=int, default=100)
    p.add_argument("--case", choices=["limit", "none"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if os.geteuid() != 0:
        print("bench/connections.py needs root (network namespaces)", file=sys.stderr)
        return 2
    if args.case:
        one_case(args.nodes, args.step, CONNECTIONS.limit if args.case == "limit" else None)
        return 0
    for case in ("none", "limit"):
        r = subprocess.run([sys.executable, __file__, "--nodes", str(args.nodes), "--step", str(args.step),
                            "--case", case], check=False)
        if r.returncode != 0:
            return r.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
