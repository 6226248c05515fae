"""One exception hierarchy for the whole core; the CLI maps it to exit codes in one place."""

from __future__ import annotations


class ImagetoolError(Exception):
    """Base of every error the core raises on purpose. The message is shown to the operator."""

    exit_code = 1


class InputError(ImagetoolError):
    """Bad input: a malformed or invalid release file, inventory, name or option."""

    exit_code = 2


class NotFoundError(InputError):
    """A release, image, node or file that was asked for does not exist."""


class AlreadyExistsError(InputError):
    """Something would be overwritten without --force."""


class RolloutFailedError(ImagetoolError):
    """A rollout or rollback where nodes failed (a node refusing the image's signature included):
    each was put back on its committed image where it could be."""

    exit_code = 3


class UnreachableError(ImagetoolError):
    """A node could not be reached (connect, authentication, host key, timeout)."""

    exit_code = 4


class HostKeyError(UnreachableError):
    """A node's host key is unknown or changed."""


class VerificationError(ImagetoolError):
    """An image, manifest or signature does not check out. Exit 5 where it ends the command
    (verify, disk, stage, a release refused before any node); in a rollout a node's refusal is
    that node's failure (RolloutFailedError, exit 3)."""

    exit_code = 5


class BuildError(ImagetoolError):
    """diskimage-builder or the squashfs step failed."""

    exit_code = 6


class HostSetupError(ImagetoolError):
    """This machine lacks something: a system tool, root, kernel support."""

    exit_code = 7


class LockedError(ImagetoolError):
    """A node is locked by another rollout."""

    exit_code = 8


class NotApprovedError(ImagetoolError):
    """A rollout run with --approve stopped after its canary: the operator rejected going on, or
    no answer came within --approve-timeout. The nodes after the canary were not touched."""

    exit_code = 9


class NodeError(ImagetoolError):
    """A node helper command failed on the node."""

    exit_code = 1


EXIT_CODES = {
    0: "success",
    1: "unexpected error",
    2: "bad input (release file, inventory, name or option)",
    3: "rollout or rollback: nodes failed (a node refusing the image included) and were put back where possible",
    4: "nodes unreachable (a rollout or rollback: every selected node)",
    5: "verification failed (sha256 or signature): verify, disk, stage, or a release refused before any node",
    6: "build failed",
    7: "missing system tool or privilege",
    8: "node locked by another rollout",
    9: "rollout stopped after the canary: approval rejected or timed out (--approve); later nodes untouched",
}
