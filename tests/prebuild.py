"""Build the test suite's images before its runs start: `python -m tests.prebuild` (scripts/test).

scripts/test runs the VM tests beside the others. A build is minutes of both cores; a qemu VM
under TCG booting meanwhile takes minutes longer than its timeouts allow. Built first, one after
the other, the images are then found in the test store (IMAGETOOL_TEST_STORE) by both runs.
"""

from __future__ import annotations

import sys
import time

from tests.conftest import EXAMPLES, TEST_STORE, build_cached

# What the session fixtures release1, release2 (signed) and release_bookworm build.
IMAGES = (("webapp-1.yaml", False), ("webapp-2.yaml", True), ("webapp-1-bookworm.yaml", False))


def main() -> int:
    for name, sign in IMAGES:
        start = time.monotonic()
        stored = build_cached(EXAMPLES / name, sign=sign)
        print(f"test image {stored.id}: ready in {TEST_STORE} ({time.monotonic() - start:.0f}s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
