"""The imagetool command line: parse, call the core, print. Nothing else lives here.

The top floor: one module of thin commands per subject, each registering on `main`
(imagetool.cli.common). The core (imagetool's image modules, rollout, the lab) never imports click.
"""

from imagetool.cli import images, lab, nodes  # noqa: F401 - importing them registers their commands
from imagetool.cli.common import main

__all__ = ["main"]
