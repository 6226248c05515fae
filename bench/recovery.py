"""Recovery figures: how long a node takes to get itself back, and what a rollout's safety costs.

    .venv/bin/python bench/recovery.py --from webapp-1 --to webapp-2 [--store DIR] [--confirm-timeout 20]

On a one-node lab, measured in one process:
  activation      a plain rollout of TO (staged first, so only the activation is timed): set-next,
                  reboot, new boot, health gate, confirm, commit
  no-op rerun     the same rollout again (connect, lock, reconcile, health, unlock, journal)
  dead-man        the node boots FROM→TO and its network is cut right then; no reset command. Time
                  from the cut until the node's firmware boots its committed image again (seen
                  from the host); the switch counts --confirm-timeout from the trial boot, so this
                  is a little under it plus the reboot
  controller wait the same run, from the cut until the controller reports the node rolled back
                  (the network is restored as soon as the node is back)
Needs root. Prints figures.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from imagetool import lab  # noqa: E402
from imagetool.store import Store, default_store_path, resolve_release  # noqa: E402
from rollout.inventory import load_inventory  # noqa: E402
from rollout.update import RolloutOptions, run_rollback, run_rollout  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--from", dest="old", required=True)
    p.add_argument("--to", dest="new", required=True)
    p.add_argument("--store", default=None)
    p.add_argument("--confirm-timeout", type=float, default=20)
    args = p.parse_args()
    store = Store(default_store_path(args.store))
    old, new = resolve_release(store, args.old), resolve_release(store, args.new)
    root = Path(tempfile.mkdtemp(prefix="imagetool-bench-", dir="/var/tmp"))
    os.environ.setdefault("IMAGETOOL_STATE_DIR", str(root / "state"))
    name = "benchrec"
    lab.down(name, root)
    the_lab = lab.up(name, 1, old, root=root, var_size=2 * 1024**3)
    try:
        opts = dict(confirm_timeout=args.confirm_timeout, health_timeout=min(15.0, args.confirm_timeout),
                    boot_timeout=60)
        inv = load_inventory(the_lab.inventory)
        doc = yaml.safe_load(the_lab.inventory.read_text())
        doc["defaults"].pop("reset_command")
        no_reset = the_lab.dir / "inventory-no-reset.yaml"
        no_reset.write_text(yaml.safe_dump(doc))

        t = time.monotonic()
        r = run_rollout(new, inv, RolloutOptions(**opts))
        first = time.monotonic() - t
        assert r.exit_code == 0, r.to_dict()
        r = run_rollback(inv, RolloutOptions(**opts))
        assert r.exit_code == 0, r.to_dict()
        t = time.monotonic()
        r = run_rollout(new, inv, RolloutOptions(**opts))
        activation = time.monotonic() - t
        assert r.exit_code == 0 and r.bytes_sent == 0, r.to_dict()
        t = time.monotonic()
        r = run_rollout(new, inv, RolloutOptions(**opts))
        noop = time.monotonic() - t
        assert r.exit_code == 0 and r.bytes_sent == 0, r.to_dict()
        r = run_rollback(inv, RolloutOptions(**opts))
        assert r.exit_code == 0, r.to_dict()

        marks: dict[str, float] = {}

        def back() -> None:
            while time.monotonic() - marks["cut"] < 600:
                if next(s.booted for s in lab.status(the_lab)) == old.id:
                    marks["back"] = time.monotonic()
                    lab.heal(the_lab, "node1")
                    return
                time.sleep(0.2)

        def events(node: str, step: str, detail: str) -> None:
            if step == "verify" and detail == "health gate" and "cut" not in marks:
                lab.cut(the_lab, "node1")
                marks["cut"] = time.monotonic()
                threading.Thread(target=back, daemon=True).start()

        r = run_rollout(new, load_inventory(no_reset), RolloutOptions(**opts), events=events)
        done = time.monotonic()
        assert r.node("node1").outcome == "rolled-back" and "back" in marks, r.to_dict()
        print(f"first rollout (stage {new.manifest.image.size / 2**20:.0f} MiB + activate): {first:6.1f} s")
        print(f"activation of a staged image (reboot, gate, commit):  {activation:6.1f} s")
        print(f"no-op rerun of the same rollout:                      {noop:6.1f} s")
        print(f"dead-man switch, cut → committed image booting:       {marks['back'] - marks['cut']:6.1f} s "
              f"(confirm timeout {args.confirm_timeout:g} s)")
        print(f"controller, cut → node reported rolled back:          {done - marks['cut']:6.1f} s")
    finally:
        lab.down(name, root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
