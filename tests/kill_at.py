"""A controller that dies with SIGKILL at an exact point of a rollout, for the crash tests.

    python -m tests.kill_at STORE RELEASE INVENTORY NODE STEP DETAIL_PREFIX OPTIONS_JSON

runs the real rollout and kills its own process (kill -9: no cleanup, no unlock, no journal end)
the moment NODE reports STEP with a detail starting with DETAIL_PREFIX. Events are reported
synchronously from the node's worker thread, so the kill lands exactly between two node actions.
STEP `transfer` kills it instead once DETAIL_PREFIX bytes of the image went to NODE.
"""

from __future__ import annotations

import json
import os
import signal
import sys

from imagetool.store import Store
from rollout.inventory import load_inventory
from rollout.update import RolloutOptions, run_rollout


def main(argv: list[str]) -> int:
    store, release_id, inventory, node, step, prefix, options = argv

    def events(n: str, s: str, detail: str) -> None:
        if n == node and s == step and detail.startswith(prefix):
            os.kill(os.getpid(), signal.SIGKILL)

    class Transfer:
        def stage_start(self, n: str, total: int) -> None:
            pass

        def stage_advance(self, n: str, done: int) -> None:
            if step == "transfer" and n == node and done >= int(prefix):
                os.kill(os.getpid(), signal.SIGKILL)

        def stage_end(self, n: str, result: object) -> None:
            pass

    run_rollout(Store(store).get(release_id), load_inventory(inventory), RolloutOptions(**json.loads(options)),
                events=events, progress=Transfer())
    return 0  # not reached when the step came


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
