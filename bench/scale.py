"""Scale: the controller driving a thousand nodes through a real rollout, measured.

    .venv/bin/python bench/scale.py [--nodes 1000] [--batches 1,10%,25%] [--parallel 4] [--batch-parallel 64]
                                       [--quick] [--profile FILE]

The nodes are local machines (rollout.local): the real node helper run as a subprocess against a
directory per node, reboots played by the machine's firmware (a new boot id, the dead-man switch
started), exactly as the unit tests run rollouts. The controller is the real one: rollout.update's
Rollout with its batches, policy, health gate and a real journal. The release is a small sample
(1000 bytes), so what is measured is the controller, not disk I/O. No root needed.

In one process, in this order: a small fleet (N/10 nodes, or more until its largest batch fills
--batch-parallel as the large one's does: 256 of 1000 by default) and one of N nodes, all on OLD; a rollout of
NEW to the small fleet; the same to the large one (timed per batch); a no-op re-run on the large
one; one helper `status` per node of the large fleet (the baseline); every node must end done,
then skipped, or the bench fails.

What is counted:
  controller CPU   getrusage(RUSAGE_SELF) over the rollout: every thread of this process, less
                   the CPU spent inside the local transport's calls (counted per call with
                   thread_time: starting the helper subprocess, reading its answer, the firmware
                   and systemd played for the machine). That part stands in for SSH and the node
                   and is printed apart. The helper subprocesses themselves (RUSAGE_CHILDREN) are
                   the nodes' CPU, printed for scale only.
  memory           the process's peak resident set (VmHWM, reset before each rollout through
                   /proc/self/clear_refs) less its resident set before it, for the small and the
                   large rollout; growth per node is their difference over the difference in nodes.
                   Both fleets exist before either rollout, and the machines keep no action log,
                   so neither shows up as the controller's. What does: per node activating at
                   once (at most --batch-parallel of a batch), its worker thread (stack, malloc
                   arena) and its command in flight (subprocess pipes and buffers here, an SSH
                   channel in production).
  no-op re-run     its wall time over the baseline's, both with the rollout's --parallel: the
                   baseline is the `ssh NODE true` of these nodes, one helper round trip each.
With --profile FILE the large rollout runs under cProfile, every thread of it (pstats format);
its CPU figures then include the profiler's own cost.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import pstats
import resource
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rollout.batch import BatchSpec  # noqa: E402
from rollout.journal import Journal  # noqa: E402
from rollout.local import Action, LocalMachine, LocalTransport  # noqa: E402
from rollout.node import HelperNode, for_each  # noqa: E402
from rollout.update import Rollout, RolloutOptions, RolloutResult  # noqa: E402
from tests.samples import make_release  # noqa: E402

T = TypeVar("T")

# The goals of issue 9.
CPU_GOAL_MS = 5.0
GROWTH_GOAL_KIB = 4.0
NOOP_GOAL_RATIO = 3.0


class NoLog(list[Action]):
    """A machine's action log that keeps nothing: a thousand nodes' logs would grow with the run
    and be counted as the controller's memory."""

    def append(self, item: Action) -> None:
        pass


class Meter:
    """CPU time and calls spent inside the local transport, summed over threads."""

    def __init__(self) -> None:
        self.cpu = 0.0
        self.calls = 0
        self._lock = threading.Lock()

    @contextmanager
    def counting(self) -> Iterator[None]:
        start = time.thread_time()
        try:
            yield
        finally:
            spent = time.thread_time() - start
            with self._lock:
                self.cpu += spent
                self.calls += 1


class MeteredTransport(LocalTransport):
    """LocalTransport whose every call (a command, a file, a reconnect) is metered."""

    def __init__(self, machine: LocalMachine, meter: Meter) -> None:
        super().__init__(machine)
        self.meter = meter

    def run(self, *args: Any, **kw: Any) -> Any:
        with self.meter.counting():
            return super().run(*args, **kw)

    def run_shell(self, *args: Any, **kw: Any) -> Any:
        with self.meter.counting():
            return super().run_shell(*args, **kw)

    def put_file(self, *args: Any, **kw: Any) -> Any:
        with self.meter.counting():
            return super().put_file(*args, **kw)

    def reconnect(self, timeout: float) -> None:
        with self.meter.counting():
            super().reconnect(timeout)


def make_fleet(base: Path, n: int, old: Any, meter: Meter) -> list[HelperNode]:
    """n local machines on OLD, committed and booted, set up a few at a time."""

    def one(i: int) -> HelperNode:
        m = LocalMachine(base / f"n{i}", log=NoLog(), timer_delay=0)
        m.install_release(old, commit=True)
        m.power_on()
        return HelperNode(m.spec(), MeteredTransport(m, meter))

    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(one, range(1, n + 1)))


def status_kib(key: str) -> int:
    """A memory figure of this process from /proc/self/status (VmRSS, VmHWM), in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/self/status")


@dataclass
class Run:
    """One measured call: wall seconds, CPU of this process and of its children, CPU inside the
    local transport, memory."""

    wall: float = 0.0
    self_cpu: float = 0.0
    children_cpu: float = 0.0
    transport_cpu: float = 0.0
    transport_calls: int = 0
    rss_before_kib: int = 0
    peak_kib: int = 0
    result: Any = None
    batch_starts: dict[int, float] = field(default_factory=dict)
    batch_ends: dict[int, float] = field(default_factory=dict)
    batch_sizes: dict[int, int] = field(default_factory=dict)

    @property
    def controller_cpu(self) -> float:
        return self.self_cpu - self.transport_cpu

    @property
    def growth_kib(self) -> int:
        return self.peak_kib - self.rss_before_kib


def _cpu(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def measure(fn: Callable[[Run], T], meter: Meter) -> Run:
    run = Run()
    gc.collect()
    # Linux: writing 5 resets the peak resident set (VmHWM) to the current one.
    Path("/proc/self/clear_refs").write_text("5")
    run.rss_before_kib = status_kib("VmRSS")
    cpu0, kids0, t_cpu0, t_calls0 = _cpu(resource.RUSAGE_SELF), _cpu(resource.RUSAGE_CHILDREN), meter.cpu, meter.calls
    t0 = time.monotonic()
    run.result = fn(run)
    run.wall = time.monotonic() - t0
    run.self_cpu = _cpu(resource.RUSAGE_SELF) - cpu0
    run.children_cpu = _cpu(resource.RUSAGE_CHILDREN) - kids0
    run.transport_cpu, run.transport_calls = meter.cpu - t_cpu0, meter.calls - t_calls0
    run.peak_kib = status_kib("VmHWM")
    return run


def rollout(nodes: list[HelperNode], release: Any, options: RolloutOptions, state: Path,
            profile: str | None = None) -> Callable[[Run], RolloutResult]:
    """A journaled rollout of `release`; the run's batches are timed from their events."""

    def go(run: Run) -> RolloutResult:
        batch_of: dict[str, int] = {}

        def on_event(node: str, step: str, detail: str) -> None:
            now = time.monotonic()
            if step == "batch":
                i = int(detail.split("/")[0])
                batch_of[node] = i
                run.batch_starts.setdefault(i, now)
                run.batch_sizes[i] = run.batch_sizes.get(i, 0) + 1
            elif step in ("done", "failed", "rolled-back") and node in batch_of:
                i = batch_of[node]
                run.batch_ends[i] = max(run.batch_ends.get(i, now), now)

        r = Rollout(nodes, options, events=on_event, journal=Journal(state, options.rollout_id or "?"))
        try:
            if profile is None:
                return r.run(release)
            return _profiled(lambda: r.run(release), profile)
        finally:
            r.events.journal.close()  # type: ignore[union-attr]

    return go


def _profiled(fn: Callable[[], T], path: str) -> T:
    """fn() under cProfile in this thread and in every thread it starts; the stats merged."""
    profiles: list[cProfile.Profile] = []

    def start_here(*_: Any) -> None:
        p = cProfile.Profile()
        profiles.append(p)
        sys.setprofile(None)
        p.enable()

    main = cProfile.Profile()
    profiles.append(main)
    threading.setprofile(start_here)
    main.enable()
    try:
        return fn()
    finally:
        main.disable()
        threading.setprofile(None)  # type: ignore[arg-type]
        stats = pstats.Stats(main)
        for p in profiles[1:]:
            p.disable()
            stats.add(p)
        stats.dump_stats(path)


def verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=1000, help="nodes of the large fleet (default 1000)")
    p.add_argument("--batches", default=None, help="default 1,10%%,25%% (--quick: 1,50%%)")
    p.add_argument("--parallel", type=int, default=RolloutOptions.parallel)
    p.add_argument("--batch-parallel", type=int, default=RolloutOptions.batch_parallel)
    p.add_argument("--quick", action="store_true", help="a smoke run: 6 nodes in two batches after the canary")
    p.add_argument("--profile", metavar="FILE", help="cProfile the large rollout into FILE")
    args = p.parse_args()
    n = 6 if args.quick else args.nodes
    args.batches = args.batches or ("1,50%" if args.quick else "1,10%,25%")
    small = small_fleet_size(n, args.batches, args.batch_parallel)
    if n <= small:
        p.error(f"--nodes {n}: need more than {small} nodes to compare two fleet sizes")

    with tempfile.TemporaryDirectory(prefix="imagetool-bench-scale-", dir="/var/tmp") as tmp:
        return run(args, n, small, Path(tmp))


def small_fleet_size(n: int, batches: str, batch_parallel: int) -> int:
    """The small fleet: a tenth of the large one, or more, until its largest batch runs as many
    nodes at once as the large fleet's (--batch-parallel caps both). The controller's memory grows
    with the nodes it activates at once as well as with the fleet: with both rollouts running the
    same number at once, their difference is what the fleet's size alone costs."""
    spec = BatchSpec.parse(batches)

    def at_once(nodes: int) -> int:
        return min(batch_parallel, max(spec.sizes(nodes)))

    small = max(2, n // 10)
    while small < n // 2 and at_once(small) < at_once(n):
        small += 1
    return small


def run(args: argparse.Namespace, n: int, small: int, root: Path) -> int:
    """Everything measured, then printed; the fleets are powered off before their directory goes."""
    meter = Meter()
    old = make_release(root / "store", "web", "1.0", b"o" * 1000)
    new = make_release(root / "store", "web", "1.1", b"x" * 1000)
    t = time.monotonic()
    small_fleet = make_fleet(root / "small", small, old, meter)
    fleet = make_fleet(root / "large", n, old, meter)
    try:
        print(f"{small} + {n} local nodes set up in {time.monotonic() - t:.0f} s ({root})", flush=True)

        def options(rid: str) -> RolloutOptions:
            return RolloutOptions(batches=args.batches, parallel=args.parallel, batch_parallel=args.batch_parallel,
                                  rollout_id=rid)

        state = root / "state"
        first = measure(rollout(small_fleet, new, options("small"), state), meter)
        print(f"rollout to {small} nodes: {first.wall:.1f} s, "
              f"controller CPU {first.controller_cpu / small * 1000:.2f} ms "
              f"per node, memory +{first.growth_kib / 1024:.1f} MiB", flush=True)
        big = measure(rollout(fleet, new, options("large"), state, args.profile), meter)
        print(f"rollout to {n} nodes: {big.wall:.1f} s, controller CPU {big.controller_cpu / n * 1000:.2f} ms "
              f"per node, memory +{big.growth_kib / 1024:.1f} MiB", flush=True)
        noop = measure(rollout(fleet, new, options("noop"), state), meter)
        print(f"no-op re-run on {n} nodes: {noop.wall:.1f} s", flush=True)
        base = measure(lambda _: for_each(fleet, lambda node: node.status(), args.parallel), meter)
        print(f"one helper status per node, {n} nodes: {base.wall:.1f} s", flush=True)

        ok = True
        for what, run, want in ((f"rollout to {small}", first, "done"), (f"rollout to {n}", big, "done"),
                                ("no-op re-run", noop, "skipped")):
            outcomes = [r.outcome for r in run.result.nodes]
            if outcomes.count(want) != len(outcomes):
                ok = False
                others = sorted({(r.node, r.outcome, r.error) for r in run.result.nodes if r.outcome != want})
                print(f"FAILED: {what}: not {want} on {others[:5]} ...", file=sys.stderr)
        failed_status = base.result.failed
        if failed_status:
            ok = False
            print(f"FAILED: status: {list(failed_status.items())[:5]}", file=sys.stderr)

        ms = 1000.0
        cpu_ms = big.controller_cpu / n * ms
        growth = (big.growth_kib - first.growth_kib) / (n - small)
        ratio = noop.wall / base.wall
        print()
        print(f"rollout of {n} nodes, batches {args.batches}, --parallel {args.parallel}, "
              f"--batch-parallel {args.batch_parallel}: "
              f"{'done' if big.result.exit_code == 0 else 'FAILED'} on "
              f"{sum(r.outcome == 'done' for r in big.result.nodes)} of {n} nodes in {big.wall:.1f} s")
        for i in sorted(big.batch_starts):
            took = big.batch_ends.get(i, 0) - big.batch_starts[i]
            print(f"  batch {i:2d} ({big.batch_sizes[i]:4d} nodes): {took:6.1f} s")
        if args.profile:
            print(f"  (under cProfile: CPU figures include the profiler; stats in {args.profile})")
        print(f"controller CPU per node:          {cpu_ms:7.2f} ms   goal <= {CPU_GOAL_MS:g} ms: "
              f"{verdict(cpu_ms <= CPU_GOAL_MS)}")
        print(f"  local transport CPU per node:   {big.transport_cpu / n * ms:7.2f} ms   "
              f"({big.transport_calls / n:.1f} calls per node; stands in for SSH and the node, not counted)")
        print(f"  node helpers' CPU per node:     {big.children_cpu / n * ms:7.2f} ms   (subprocesses, not counted)")
        print(f"controller peak memory:           {big.peak_kib / 1024:7.1f} MiB  "
              f"(+{first.growth_kib / 1024:.1f} MiB over the run at {small} nodes, "
              f"+{big.growth_kib / 1024:.1f} MiB at {n})")
        print(f"memory growth per node:           {growth:7.2f} KiB  goal <= {GROWTH_GOAL_KIB:g} KiB: "
              f"{verdict(growth <= GROWTH_GOAL_KIB)}")
        print(f"no-op re-run per node:            {noop.wall / n * ms:7.2f} ms   "
              f"({noop.transport_calls / n:.1f} calls per node, controller CPU {noop.controller_cpu / n * ms:.2f} ms)")
        print(f"one helper status per node:       {base.wall / n * ms:7.2f} ms   (the baseline: ssh NODE true)")
        print(f"no-op re-run / baseline:          {ratio:7.2f} x    goal <= {NOOP_GOAL_RATIO:g} x: "
              f"{verdict(ratio <= NOOP_GOAL_RATIO)}")
        print(f"every node done, then skipped:    {'yes' if ok else 'NO'}")
        return 0 if ok else 1
    finally:
        for node in small_fleet + fleet:
            node.transport.machine.power_off()  # type: ignore[attr-defined]


if __name__ == "__main__":
    sys.exit(main())
