"""Health-check kinds, registered by their YAML key (`command`, `tcp`, `http`).

An inventory check names exactly one kind by its key (`- {name: web, http: "http://{host}/"}`),
and the command line adds checks with `--check-KEY`. Each kind is one class here holding all that
is particular to it, side by side: how its target is checked, the extra keys it takes, how it is
read from its command-line flag, and how it probes a node. A new kind is one more class with
`@register`; the CLI makes its `--check-KEY` option from the class.

The health gate (rollout.health) runs the checks with their retries; this module only knows
what one attempt of one check is.
"""

from __future__ import annotations

import math
import re
import shlex
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar

from imagetool import schema
from imagetool.errors import ImagetoolError, InputError
from imagetool.schema import Where

if TYPE_CHECKING:
    from rollout.node import Node
    from rollout.nodespec import NodeSpec

CHECK_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Only these placeholders are substituted in check targets; any other brace (a shell `${x}` or an
# awk program in a command check) is left alone, which str.format could not do.
PLACEHOLDER_RE = re.compile(r"\{(host|name|port|user|vars\.[A-Za-z0-9_.-]+)\}")
OUTPUT_LIMIT = 2000


def shell_placeholder_problem(command: str) -> str | None:
    """Why the placeholders in the shell command `command` could not be made safe, or None.

    A value is substituted as one shell-quoted word, which is safe only where the shell reads a
    plain word: inside '...' or "..." the quotes of the value would close the operator's and its
    text would run (`echo "{vars.x}"` with x = `"; reboot; "`), and a here-document's body is
    expanded without regard to quotes. There, a placeholder is refused: write it unquoted, it is
    quoted for you."""
    if not PLACEHOLDER_RE.search(command):
        return None
    heredoc = re.search(r"<<(?!<)", command)
    if heredoc and PLACEHOLDER_RE.search(command, heredoc.start()):
        return "a placeholder after '<<' (a here-document) cannot be quoted safely; pass the value as an argument"
    quote: str | None = None
    i = 0
    while i < len(command):
        c = command[i]
        if quote is None or quote == '"':
            m = PLACEHOLDER_RE.match(command, i)
            if m and quote == '"':
                return (f"placeholder {m.group(0)} inside double quotes: write it unquoted (it is shell-quoted "
                        "for you), e.g. echo {vars.x} rather than echo \"{vars.x}\"")
            if c == "\\":
                i += 2
                continue
            if c == '"':
                quote = None if quote == '"' else '"'
            elif c == "'" and quote is None:
                quote = "'"
        elif c == "'":  # inside '...' nothing but the closing quote counts
            quote = None
        elif (m := PLACEHOLDER_RE.match(command, i)) is not None:
            return (f"placeholder {m.group(0)} inside single quotes: write it unquoted (it is shell-quoted "
                    "for you)")
        i += 1
    return None


@dataclass(frozen=True)
class CheckSpec:
    """One extra health check; run by the health gate, per node, after `for_node`.

    `kind` is a key of KINDS. `retries` is how many attempts the check gets before it counts as
    failed (at least 1), `interval` the seconds between attempts, `timeout` the limit of one
    attempt. `expect_status` is the http kind's own option.
    """

    name: str
    kind: str
    target: str
    expect_status: int = 200
    timeout: float = 5
    retries: int = 3
    interval: float = 1.0

    def for_node(self, node: NodeSpec) -> CheckSpec:
        """This check with {host}, {name}, {port}, {user} and {vars.X} filled in for `node`.

        Values substituted into a shell command are shell-quoted, and the command was checked
        (shell_placeholder_problem) to hold them only where a quoted word stays one word. In a
        URL or HOST:PORT a value must not carry spaces or control characters.
        """
        shell = KINDS[self.kind].shell
        if shell:
            problem = shell_placeholder_problem(self.target)
            if problem:
                raise InputError(f"health check {self.name!r}: {problem}")

        def value(match: re.Match[str]) -> str:
            key = match.group(1)
            if key.startswith("vars."):
                var = key[len("vars."):]
                if var not in node.vars:
                    raise InputError(
                        f"health check {self.name!r}: node {node.name} has no var {var!r} "
                        f"(used as {{{key}}} in {self.target!r})"
                    )
                text = str(node.vars[var])
            else:
                text = str(getattr(node, key))
            if shell:
                return shlex.quote(text)
            if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in text):
                raise InputError(f"health check {self.name!r}: node {node.name}: {{{key}}} = {text!r} "
                                 f"has spaces or control characters, which {self.kind} targets cannot hold")
            return text

        return replace(self, target=PLACEHOLDER_RE.sub(value, self.target))


@dataclass
class CheckResult:
    name: str
    ok: bool
    detail: str = ""
    output: str = ""
    seconds: float = 0.0

    @classmethod
    def from_helper(cls, doc: dict[str, Any]) -> CheckResult:
        seconds: Any = doc.get("seconds")
        # The node's word: a number that is not one is shown as 0, not a crash of the gate.
        ok_number = isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and math.isfinite(seconds)
        return cls(name=str(doc.get("name")), ok=doc.get("ok") is True, detail=str(doc.get("detail") or ""),
                   output=str(doc.get("output") or "")[-OUTPUT_LIMIT:], seconds=float(seconds) if ok_number else 0.0)


def _tail(text: str) -> str:
    return text.strip()[-OUTPUT_LIMIT:]


# --- the registry ------------------------------------------------------------------------------


class CheckKind:
    """What is particular to one kind of check. Subclasses set `key` and override what differs."""

    key: ClassVar[str]
    # Its target is a shell command: placeholders are shell-quoted, other braces left alone.
    shell: ClassVar[bool] = False
    # YAML keys only this kind takes, with their check (CheckSpec has a field of the same name).
    options: ClassVar[dict[str, Callable[[Any, Where], Any]]] = {}
    # How `--check-KEY` shows in the command line's help.
    metavar: ClassVar[str] = "ARG"
    flag_help: ClassVar[str] = ""

    @classmethod
    def check_target(cls, target: str) -> str | None:
        """What is wrong with `target`, or None."""
        return None

    @classmethod
    def from_flag(cls, arg: str, index: int) -> CheckSpec:
        """The check given as `--check-KEY ARG` (the index-th such flag)."""
        problem = cls.check_target(arg)
        if problem:
            raise InputError(f"--check-{cls.key} {arg!r}: {problem}")
        return CheckSpec(name=f"cli-{cls.key}-{index + 1}", kind=cls.key, target=arg)

    @classmethod
    def probe(cls, node: Node, check: CheckSpec) -> CheckResult:
        """One attempt of `check` (already filled in for `node`); never raises."""
        raise NotImplementedError


KINDS: dict[str, type[CheckKind]] = {}


def register(kind: type[CheckKind]) -> type[CheckKind]:
    KINDS[kind.key] = kind
    return kind


@register
class CommandCheck(CheckKind):
    """A shell command run on the node; passes when it exits 0."""

    key = "command"
    shell = True
    metavar = "CMD"
    flag_help = "Extra check command run on the node (repeatable)."

    @classmethod
    def check_target(cls, target: str) -> str | None:
        return shell_placeholder_problem(target)

    @classmethod
    def from_flag(cls, arg: str, index: int) -> CheckSpec:
        if not arg.strip():
            raise InputError("--check-command: the command is empty")
        problem = cls.check_target(arg)
        if problem:
            raise InputError(f"--check-command {arg!r}: {problem}")
        return CheckSpec(name=f"cli-command-{index + 1}", kind=cls.key, target=arg)

    @classmethod
    def probe(cls, node: Node, check: CheckSpec) -> CheckResult:
        try:
            r = node.run_shell(check.target, timeout=check.timeout)
            return CheckResult(check.name, r.ok, f"`{check.target}`: exit status {r.exit_status}",
                               _tail(r.stdout + r.stderr))
        except ImagetoolError as e:
            return CheckResult(check.name, False, f"`{check.target}`: {e}")


@register
class TcpCheck(CheckKind):
    """A TCP connection from the controller to HOST:PORT; passes when it is accepted."""

    key = "tcp"
    metavar = "HOST:PORT"
    flag_help = "Extra TCP check from here, e.g. {host}:5432 (repeatable)."

    @classmethod
    def check_target(cls, target: str) -> str | None:
        if not re.match(r"^.+:(\d+|\{[^}]+\})$", target):
            return "expected HOST:PORT, e.g. '{host}:22'"
        return None

    @classmethod
    def probe(cls, node: Node, check: CheckSpec) -> CheckResult:
        host, _, port = check.target.rpartition(":")
        host = host.strip("[]")
        try:
            with socket.create_connection((host, int(port)), timeout=check.timeout):
                pass
            return CheckResult(check.name, True, f"tcp {check.target}: connected")
        except (OSError, ValueError) as e:
            return CheckResult(check.name, False, f"tcp {check.target}: {e}")


def _http_status(value: Any, where: Where) -> int:
    return schema.integer(value, where, minimum=100, maximum=599, what="an HTTP status")


@register
class HttpCheck(CheckKind):
    """An HTTP GET from the controller; passes when the status is `expect_status` (200)."""

    key = "http"
    options = {"expect_status": _http_status}
    metavar = "URL[=STATUS]"
    flag_help = "Extra health check from here, e.g. http://{host}:8080/health=200 (repeatable)."

    @classmethod
    def check_target(cls, target: str) -> str | None:
        if not re.match(r"^https?://", target):
            return "expected an http:// or https:// URL"
        return None

    @classmethod
    def from_flag(cls, arg: str, index: int) -> CheckSpec:
        """URL[=STATUS], e.g. http://{host}:8080/health=204."""
        url, status = arg, 200
        m = re.match(r"^(.*)=(\d{3})$", arg)
        if m:
            url, status = m.group(1), int(m.group(2))
        if cls.check_target(url):
            raise InputError(f"--check-http {arg!r}: expected an http:// or https:// URL, optionally =STATUS")
        if not 100 <= status <= 599:
            raise InputError(f"--check-http {arg!r}: {status} is not an HTTP status")
        return CheckSpec(name=f"cli-http-{index + 1}", kind=cls.key, target=url, expect_status=status)

    @classmethod
    def probe(cls, node: Node, check: CheckSpec) -> CheckResult:
        # urllib raises for >= 400, which may be the expected status.
        try:
            with urllib.request.urlopen(check.target, timeout=check.timeout) as resp:  # noqa: S310 - operator's URL
                status, body = resp.status, resp.read(OUTPUT_LIMIT).decode("utf-8", "replace")
        except urllib.error.HTTPError as e:
            status, body = e.code, (e.read(OUTPUT_LIMIT) or b"").decode("utf-8", "replace")
        except (OSError, ValueError) as e:
            return CheckResult(check.name, False, f"GET {check.target}: {getattr(e, 'reason', e)}")
        ok = status == check.expect_status
        return CheckResult(check.name, ok, f"GET {check.target}: status {status} (expected {check.expect_status})",
                           "" if ok else _tail(body))


# --- reading checks ----------------------------------------------------------------------------

COMMON_KEYS = ("timeout", "retries", "interval")


def check_keys() -> tuple[str, ...]:
    """The keys an inventory check may have."""
    options = [o for kind in KINDS.values() for o in kind.options]
    return ("name", *KINDS, *options, *COMMON_KEYS)


def parse_checks(value: Any, where: Where) -> list[CheckSpec]:
    """The inventory's `health_checks:` list; each item is labelled by its name in errors."""
    if value is not None and not isinstance(value, list):
        raise where.got("a list of checks", value)
    checks: list[CheckSpec] = []
    for i, raw in enumerate(value or []):
        label = raw["name"] if isinstance(raw, dict) and isinstance(raw.get("name"), str) else i
        w = where / label
        spec = schema.mapping(raw, w, check_keys(), optional=False)
        if "name" not in spec:
            raise w.missing("name")
        name = schema.string(spec["name"], w / "name", non_empty=True)
        if not CHECK_NAME_RE.match(name):
            raise (w / "name").error(f"{name!r} is not a valid check name ([A-Za-z0-9][A-Za-z0-9_.-]*)")
        if any(c.name == name for c in checks):
            raise (w / "name").error(f"duplicate health check name {name!r}")
        keys = [k for k in KINDS if k in spec]
        if len(keys) != 1:
            found = f"got {', '.join(keys)}" if keys else "got none"
            raise w.error(f"a check needs exactly one of {', '.join(KINDS)} ({found})")
        kind = KINDS[keys[0]]
        wt = w / kind.key
        target = schema.string(spec[kind.key], wt, non_empty=True)
        problem = kind.check_target(target)
        if problem:
            raise wt.error(f"{target!r}: {problem}")
        if not kind.shell:
            for placeholder in re.findall(r"\{([A-Za-z0-9_.]+)\}", target):
                if not PLACEHOLDER_RE.fullmatch("{" + placeholder + "}"):
                    raise wt.error(
                        f"unknown placeholder {{{placeholder}}} (known: host, name, port, user, vars.NAME)"
                    )
        options: dict[str, Any] = {}
        for other in KINDS.values():
            for option, check in other.options.items():
                if option not in spec:
                    continue
                if other is not kind:
                    raise (w / option).error(f"only {other.key} checks take {option!r}")
                options[option] = check(spec[option], w / option)
        checks.append(
            CheckSpec(
                name=name,
                kind=kind.key,
                target=target,
                timeout=schema.number(spec.get("timeout", 5), w / "timeout", minimum=0.001,
                                      maximum=schema.MAX_SECONDS),
                retries=schema.integer(spec.get("retries", 3), w / "retries", minimum=1, maximum=1000),
                interval=float(schema.number(spec.get("interval", 1.0), w / "interval", minimum=0,
                                             maximum=schema.MAX_SECONDS)),
                **options,
            )
        )
    return checks


def cli_checks(**flags: Iterable[str]) -> list[CheckSpec]:
    """The checks given on the command line, by kind: cli_checks(http=[...], tcp=[...])."""
    checks: list[CheckSpec] = []
    for key, args in flags.items():
        checks.extend(KINDS[key].from_flag(arg, i) for i, arg in enumerate(args))
    return checks


def attempt(node: Node, check: CheckSpec) -> CheckResult:
    """One attempt of `check` on `node`, timed."""
    start = time.monotonic()
    result = KINDS[check.kind].probe(node, check)
    result.seconds = time.monotonic() - start
    return result
