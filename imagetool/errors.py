"""One exception hierarchy for the whole core; the CLI maps it to exit codes in one place.

Each error has an exit code and a `kind` (the `kind` of `--json`'s error object), and names the
nodes it concerns where the raiser knows them, so a machine reading the error need not parse
the message.
"""

from __future__ import annotations

from collections.abc import Iterable


class ImagetoolError(Exception):
    """Base of every error the core raises on purpose. The message is shown to the operator."""

    exit_code = 1
    kind = "error"

    def __init__(self, message: str = "", *, nodes: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.nodes: tuple[str, ...] = tuple(nodes)


class InputError(ImagetoolError):
    """Bad input: a malformed or invalid release file, inventory, name or option."""

    kind = "input"
    exit_code = 2


class NotFoundError(InputError):
    """A release, image, node or file that was asked for does not exist."""

    kind = "not-found"


class AlreadyExistsError(InputError):
    """Something would be overwritten without --force."""

    kind = "already-exists"


class RolloutFailedError(ImagetoolError):
    """A rollout or rollback where nodes failed (a node refusing the image's signature included):
    each was put back on its committed image where it could be."""

    kind = "rollout-failed"
    exit_code = 3


class UnreachableError(ImagetoolError):
    """A node could not be reached (connect, authentication, host key, timeout)."""

    kind = "unreachable"
    exit_code = 4


class HostKeyError(UnreachableError):
    """A node's host key is unknown or changed."""

    kind = "host-key"


class VerificationError(ImagetoolError):
    """An image, manifest or signature does not check out. Exit 5 where it ends the command
    (verify, disk, stage, a release refused before any node); in a rollout a node's refusal is
    that node's failure (RolloutFailedError, exit 3)."""

    kind = "verification"
    exit_code = 5


class BuildError(ImagetoolError):
    """diskimage-builder or the squashfs step failed."""

    kind = "build"
    exit_code = 6


class HostSetupError(ImagetoolError):
    """This machine lacks something: a system tool, root, kernel support."""

    kind = "host-setup"
    exit_code = 7


class LockedError(ImagetoolError):
    """A node is locked by another rollout."""

    kind = "locked"
    exit_code = 8


class NotApprovedError(ImagetoolError):
    """A rollout run with --approve stopped after its canary: the operator rejected going on, or
    no answer came within --approve-timeout. The nodes after the canary were not touched."""

    exit_code = 9


class NodeError(ImagetoolError):
    """A node helper command failed on the node."""

    kind = "node"
    exit_code = 1


class HelperMissingError(NodeError):
    """SSH works but the node has no node helper (`imagetool-node` not found): it was not installed
    from an imagetool image. Not "unreachable": the node answered, and retrying will not help."""

    kind = "helper-missing"


class UnhealthyError(ImagetoolError):
    """`status`: every node answered, and one or more of them is unhealthy."""

    kind = "unhealthy"
    exit_code = 3


EXIT_CODES = {
    0: "success",
    1: "unexpected error",
    2: "bad input (release file, inventory, name or option)",
    3: "rollout or rollback: nodes failed (a node refusing the image included) and were put back where possible; "
       "status: a node is unhealthy",
    4: "nodes unreachable (a rollout or rollback: every selected node; status: a node is unreachable)",
    5: "verification failed (sha256 or signature): verify, disk, stage, or a release refused before any node",
    6: "build failed",
    7: "missing system tool or privilege",
    8: "node locked by another rollout",
    9: "rollout stopped after the canary: approval rejected or timed out (--approve); later nodes untouched",
    130: "interrupted (Ctrl-C); nodes in flight were put back",
}
