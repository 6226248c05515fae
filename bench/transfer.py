"""Push throughput: SSHTransport.put_file against OpenSSH scp, to a throwaway sshd.

Run as root: `.venv/bin/python bench/transfer.py [--size-mb 240] [--rounds 3]`.
Starts the test suite's throwaway sshd (its own network namespace and veth, 10.250.254.2),
makes a file of incompressible data, and alternates scp and put_file of it, so that load from
anything else running on the machine hits both about equally. Prints MB/s for each and the
median of the per-round ratios put_file/scp (1.0 = as fast as scp, higher is faster).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rollout.transport import SSHTransport  # noqa: E402
from tests.sshd_fixture import NODE_ADDR, throwaway_sshd  # noqa: E402

MB = 1000 * 1000


def make_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            block = os.urandom(min(left, 4 << 20))
            f.write(block)
            left -= len(block)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=240)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/transfer.py needs root (network namespaces)", file=sys.stderr)
        return 2

    size = args.size_mb * MB
    with tempfile.TemporaryDirectory(prefix="itest-bench-") as tmp, throwaway_sshd() as server:
        local = Path(tmp) / "payload.bin"
        make_file(local, size)
        transport = SSHTransport(server.node)
        transport.connect()  # connection set-up is not what is measured; scp pays it, though
        remote_dir = transport.run(["mktemp", "-d", "/tmp/itest-bench-XXXXXX"], check=True).stdout.strip()
        scp_cmd = [
            "scp", "-q", "-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={server.known_hosts}",
            "-i", str(server.client_key), str(local), f"root@{NODE_ADDR}:{remote_dir}/scp.bin",
        ]
        scp_rates: list[float] = []
        put_rates: list[float] = []
        ratios: list[float] = []
        try:
            for i in range(1, args.rounds + 1):
                t0 = time.perf_counter()
                subprocess.run(scp_cmd, check=True)
                scp_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                transport.put_file(local, f"{remote_dir}/put.bin")
                put_s = time.perf_counter() - t0
                scp_rates.append(size / MB / scp_s)
                put_rates.append(size / MB / put_s)
                ratios.append(scp_s / put_s)
                print(
                    f"round {i}: scp {scp_s:5.2f}s {scp_rates[-1]:6.1f} MB/s   "
                    f"put_file {put_s:5.2f}s {put_rates[-1]:6.1f} MB/s   ratio {ratios[-1]:.2f}",
                    flush=True,
                )
            sums = transport.run(["sha256sum", f"{remote_dir}/scp.bin", f"{remote_dir}/put.bin"], check=True)
            a, b = (line.split()[0] for line in sums.stdout.splitlines())
            if a != b:
                print(f"MISMATCH: scp {a} put_file {b}", file=sys.stderr)
                return 1
            tr = transport._client.get_transport()  # noqa: SLF001 - report the negotiated cipher
            print(
                f"{args.size_mb} MB, {args.rounds} rounds, put_file cipher {tr.local_cipher}: "
                f"median scp {statistics.median(scp_rates):.1f} MB/s, "
                f"put_file {statistics.median(put_rates):.1f} MB/s, "
                f"ratio put_file/scp {statistics.median(ratios):.2f}"
            )
        finally:
            transport.run(["rm", "-rf", remote_dir])
            transport.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
