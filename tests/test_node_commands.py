"""The commands sent to nodes, as exact argv lists (deploy-rs style), and how answers are read."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from imagetool.errors import HelperMissingError, LockedError, NodeError, UnreachableError, VerificationError
from rollout.inventory import NodeSpec, load_inventory
from rollout.locks import Holder, LockClaim
from rollout.node import (
    BootTimeoutError,
    HelperError,
    HelperNode,
    NodeStatus,
    become_argv,
    helper_argv,
    incoming_paths,
    parse_answer,
    under_lock,
)
from rollout.transport import CommandResult


@pytest.mark.parametrize(
    "args, kwargs, expected",
    [
        (("status",), {}, ["imagetool-node", "status"]),
        (("stage-info", "web-1.0"), {}, ["imagetool-node", "stage-info", "web-1.0"]),
        (("stage-commit", "web-1.0"), {}, ["imagetool-node", "stage-commit", "web-1.0"]),
        (("set-next", "web-1.1"), {"confirm_timeout": 30, "rollout": "r-1"},
         ["imagetool-node", "set-next", "web-1.1", "--confirm-timeout", "30", "--rollout", "r-1"]),
        (("set-next", "web-1.1"), {"confirm_timeout": 300.0, "rollout": None},
         ["imagetool-node", "set-next", "web-1.1", "--confirm-timeout", "300"]),
        (("set-next", "web-1.1"), {"confirm_timeout": 1.5, "rollout": "r"},
         ["imagetool-node", "set-next", "web-1.1", "--confirm-timeout", "1.5", "--rollout", "r"]),
        (("clear-next",), {}, ["imagetool-node", "clear-next"]),
        (("reboot",), {}, ["imagetool-node", "reboot"]),
        (("confirm", "web-1.1"), {}, ["imagetool-node", "confirm", "web-1.1"]),
        (("commit", "web-1.1"), {"rollout": "20261123T093000-abc123"},
         ["imagetool-node", "commit", "web-1.1", "--rollout", "20261123T093000-abc123"]),
        (("health",), {"wait": 10}, ["imagetool-node", "health", "--wait", "10"]),
        (("lock", "r-1"), {"owner": "ops@ctl", "command": "imagetool rollout web-1.1", "break_older_than": None},
         ["imagetool-node", "lock", "r-1", "--owner", "ops@ctl", "--command", "imagetool rollout web-1.1"]),
        (("lock", "r-1"), {"owner": "o", "command": "--x", "break_older_than": 3600},
         ["imagetool-node", "lock", "r-1", "--owner", "o", "--command=--x", "--break-older-than", "3600"]),
        (("lock", "r-2"), {"owner": "o", "command": "c", "token": "t1234567", "holder": '{"pid":7}',
                           "take_over": "r-1", "take_over_token": "sha256-ab"},
         ["imagetool-node", "lock", "r-2", "--owner", "o", "--command", "c", "--token", "t1234567",
          "--holder", '{"pid":7}', "--take-over", "r-1", "--take-over-token", "sha256-ab"]),
        (("unlock", "r-1"), {}, ["imagetool-node", "unlock", "r-1"]),
        (("unlock", "r-1"), {"token": "t1234567"}, ["imagetool-node", "unlock", "r-1", "--token", "t1234567"]),
        (("gc",), {"keep": 1, "incoming": True}, ["imagetool-node", "gc", "--keep", "1", "--incoming"]),
        (("gc",), {"keep": 0, "incoming": False}, ["imagetool-node", "gc", "--keep", "0"]),
    ],
)
def test_helper_argv(args: tuple[str, ...], kwargs: dict[str, Any], expected: list[str]) -> None:
    assert helper_argv(*args, **kwargs) == expected


def test_incoming_paths() -> None:
    assert incoming_paths("/var/lib/imagetool/images/.incoming/", "web-1.1") == {
        "squashfs": "/var/lib/imagetool/images/.incoming/web-1.1.squashfs",
        "manifest": "/var/lib/imagetool/images/.incoming/web-1.1.manifest.json",
        "sig": "/var/lib/imagetool/images/.incoming/web-1.1.sig",
    }


def result(stdout: str, status: int = 0, stderr: str = "") -> CommandResult:
    return CommandResult("imagetool-node x", status, stdout, stderr, "10.0.0.1", "n1")


def test_parse_answer_ok_and_refusal() -> None:
    assert parse_answer("n1", "status", result('{"ok": true, "booted": "web-1.0"}\n'))["booted"] == "web-1.0"
    with pytest.raises(HelperError, match=r"node n1: imagetool-node set-next: web-9 is not staged") as e:
        parse_answer("n1", "set-next", result('{"ok": false, "error": "web-9 is not staged"}', 1))
    assert e.value.error == "web-9 is not staged" and isinstance(e.value, NodeError)


def test_parse_answer_without_json() -> None:
    with pytest.raises(HelperMissingError, match="node n1: node helper missing at /usr/sbin/imagetool-node") as e:
        parse_answer("n1", "status", result("", 127, "sh: imagetool-node: not found"))
    assert not isinstance(e.value, UnreachableError) and e.value.nodes == ("n1",)
    with pytest.raises(NodeError, match=r"gave no answer \(exit status 1\):\nTraceback"):
        parse_answer("n1", "status", result("", 1, "Traceback (most recent call last):"))


STATUS = {
    "ok": True, "hostname": "n1", "booted": "web-1.0", "release": {}, "boot_id": "b-1", "default": "web-1.0",
    "next": None, "committed": "web-1.0", "previous": "web-0.9", "last_rollout": "r-0", "trial": None,
    "images": [{"id": "web-0.9", "size": 10, "sha256": "a" * 64, "signed": False, "mtime": 1},
               {"id": "web-1.0", "size": 20, "sha256": "b" * 64, "signed": True, "mtime": 2}],
    "free_bytes": 12345, "lock": None, "system_state": "running", "time": 0,
}


def test_node_status_from_answer() -> None:
    st = NodeStatus.from_answer("n1", STATUS)
    assert (st.booted, st.default, st.committed, st.previous, st.boot_id) == ("web-1.0", "web-1.0", "web-1.0", "web-0.9", "b-1")
    assert st.has_image("web-0.9") and not st.has_image("web-1.1")
    assert st.image("web-1.0").sha256 == "b" * 64  # type: ignore[union-attr]
    assert st.settled_on("web-1.0") and not st.settled_on("web-0.9")
    # A helper before protocol 3 said "signed" for "a .sig file exists": not shown as verified.
    assert st.to_dict()["images"][1]["signed"] is False and st.trusted_keys is None


def test_node_status_signed_means_verified_from_protocol_3() -> None:
    doc = {**STATUS, "protocol": 3,
           "images": [{**STATUS["images"][1], "signed_by": "release.pem", "signature": "verified"}],
           "trusted_keys": [{"name": "release.pem", "where": "var", "sha256": "c" * 64}]}
    st = NodeStatus.from_answer("n1", doc)
    img = st.image("web-1.0")
    assert img is not None and (img.signed, img.signed_by, img.signature) == (True, "release.pem", "verified")
    assert st.to_dict()["trusted_keys"] == [{"name": "release.pem", "where": "var", "sha256": "c" * 64}]


def test_a_verification_refusal_is_a_verification_error() -> None:
    answer = result('{"ok": false, "error": "web-1.1: signature refused", "kind": "verification"}', 1)
    with pytest.raises(VerificationError, match="node n1: imagetool-node verify: web-1.1: signature refused") as e:
        parse_answer("n1", "verify", answer)
    assert e.value.exit_code == 5


class ScriptedTransport:
    """Answers helper commands from a script: argv[1] -> list of answers (dicts or exceptions)."""

    def __init__(self, answers: dict[str, list[Any]]) -> None:
        self.answers = answers
        self.calls: list[list[str]] = []
        self.closed = 0
        self.connected = True
        self.connect_timeout = 10.0

    def reconnect(self, timeout: float) -> None:
        self.connected = True

    def run(self, argv: list[str], *, timeout: float = 60, **_: Any) -> CommandResult:
        self.calls.append(list(argv))
        queue = self.answers[argv[1]]
        answer = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(answer, BaseException):
            raise answer
        return result(json.dumps(answer), 0 if answer.get("ok") else 1)

    def close(self) -> None:
        self.closed += 1
        self.connected = False


def node(answers: dict[str, list[Any]], **spec: Any) -> tuple[HelperNode, ScriptedTransport]:
    t = ScriptedTransport(answers)
    return HelperNode(NodeSpec(name="n1", host="10.0.0.1", **spec), t), t  # type: ignore[arg-type]


def test_helper_node_sends_exact_commands() -> None:
    ok = {"ok": True}
    n, t = node({"set-next": [ok], "commit": [ok], "confirm": [ok], "clear-next": [ok],
                 "reboot": [{"ok": True, "boot_id": "b-1"}]})
    n.set_next("web-1.1", 300, "r-1")
    assert n.reboot() == "b-1"
    n.confirm("web-1.1")
    n.commit("web-1.1", "r-1")
    n.clear_next()
    assert t.calls == [
        ["imagetool-node", "set-next", "web-1.1", "--confirm-timeout", "300", "--rollout", "r-1"],
        ["imagetool-node", "reboot"],
        ["imagetool-node", "confirm", "web-1.1"],
        ["imagetool-node", "commit", "web-1.1", "--rollout", "r-1"],
        ["imagetool-node", "clear-next"],
    ]


def test_become_argv() -> None:
    plain = NodeSpec(name="n1", host="10.0.0.1", user="deploy")
    assert become_argv(plain, ["imagetool-node", "status"]) == ["imagetool-node", "status"]
    become = NodeSpec(name="n1", host="10.0.0.1", user="deploy", become=True)
    assert become_argv(become, ["imagetool-node", "status"]) == ["sudo", "-n", "-u", "root", "--", "imagetool-node", "status"]
    other = NodeSpec(name="n1", host="10.0.0.1", user="deploy", become=True, become_user="imagetool")
    assert become_argv(other, ["imagetool-node", "gc"]) == ["sudo", "-n", "-u", "imagetool", "--", "imagetool-node", "gc"]


class SudoTransport(ScriptedTransport):
    """A login user's node: helper commands arrive behind `sudo -n ... --`; `password` makes sudo
    refuse them as it does without a NOPASSWD rule."""

    def __init__(self, answers: dict[str, list[Any]], password: bool = False) -> None:
        super().__init__(answers)
        self.password = password

    def run(self, argv: list[str], *, timeout: float = 60, **_: Any) -> CommandResult:
        assert argv[:5] == ["sudo", "-n", "-u", "root", "--"]
        if self.password:
            self.calls.append(list(argv))
            return CommandResult(" ".join(argv), 1, "", "sudo: a password is required\n")
        result = super().run(argv[5:])
        self.calls[-1] = list(argv)
        return result


def test_helper_node_with_become() -> None:
    spec = NodeSpec(name="n1", host="10.0.0.1", user="deploy", become=True)
    t = SudoTransport({"stage-abort": [{"ok": True, "freed_bytes": 3}]})
    assert HelperNode(spec, t).stage_abort("web-1.1")["freed_bytes"] == 3  # type: ignore[arg-type]
    assert t.calls == [["sudo", "-n", "-u", "root", "--", "imagetool-node", "stage-abort", "web-1.1"]]
    # stage-delta too, pushed pack or pulled from a store (--source)
    t = SudoTransport({"stage-delta": [{"ok": True}]})
    n = HelperNode(spec, t)  # type: ignore[arg-type]
    n.stage_delta("web-1.1", ["web-1.0"], source="http://store:8080/", timeout=600)
    n.stage_delta("web-1.1", ["web-1.0"], pack="web-1.1.delta-" + "a" * 32 + ".tar")
    assert t.calls == [
        ["sudo", "-n", "-u", "root", "--", "imagetool-node", "stage-delta", "web-1.1", "--source",
         "http://store:8080/", "--timeout", "600", "--seed", "web-1.0"],
        ["sudo", "-n", "-u", "root", "--", "imagetool-node", "stage-delta", "web-1.1", "--pack",
         "web-1.1.delta-" + "a" * 32 + ".tar", "--seed", "web-1.0"],
    ]
    n = HelperNode(spec, SudoTransport({}, password=True))  # type: ignore[arg-type]
    with pytest.raises(NodeError, match=r"node n1: sudo asks 'deploy' for a password to run imagetool-node as 'root' "
                                        r"\(become\); .*`deploy ALL=\(root\) NOPASSWD: /usr/sbin/imagetool-node`"):
        n.stage_info("web-1.1")


CLAIM = LockClaim("r-2", "me@here", "imagetool rollout", token="c" * 32,
                  holder=Holder(boot_id="b-1", pid_ns="pid:[1]", pid=77, start=500, machine_id="m-1"))
HOLDER_JSON = '{"boot_id":"b-1","machine_id":"m-1","pid":77,"pid_ns":"pid:[1]","start":500}'


def test_lock_refusal_is_locked_error() -> None:
    n, _ = node({"status": [{**STATUS, "protocol": 3}], "lock": [{"ok": False, "error": "locked by rollout r-0 of ops@ctl"}]})
    with pytest.raises(LockedError, match="node n1: locked by rollout r-0"):
        n.lock(CLAIM)


def test_wait_for_boot_reconnects_until_new_boot_id(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("rollout.node.BOOT_POLL_INTERVAL", 0)
    lost = UnreachableError("node n1: connection lost")
    n, t = node({"status": [{**STATUS, "boot_id": "b-1"}, lost, lost, {**STATUS, "boot_id": "b-2"}]})
    st = n.wait_for_boot("b-1", timeout=10)
    assert st.boot_id == "b-2"
    assert t.closed == 2  # a lost connection is dropped, so the next attempt opens a new one
    assert len(t.calls) == 4


def test_wait_for_boot_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("rollout.node.BOOT_POLL_INTERVAL", 0.01)
    n, _ = node({"status": [{**STATUS, "boot_id": "b-1"}]})
    with pytest.raises(BootTimeoutError, match=r"node n1: not back with a new boot within 0.1s \(still on the old boot\)"):
        n.wait_for_boot("b-1", timeout=0.1)


def test_reset_command_from_inventory(tmp_path: Path) -> None:
    inv = tmp_path / "inv.yaml"
    inv.write_text(
        "defaults:\n  reset_command: \"virsh reset {name} --host {host}\"\n"
        "nodes:\n  a: {host: 10.0.0.1}\n  b: {host: 10.0.0.2, reset_command: \"/bin/echo '{x}' {name}\"}\n"
        "  c: {host: 10.0.0.3, reset_command: \"ipmitool -H {host} power reset\"}\n"
    )
    nodes = {n.name: n for n in load_inventory(inv, ssh_config=tmp_path / "none").nodes}
    assert nodes["a"].reset_argv() == ["virsh", "reset", "a", "--host", "10.0.0.1"]
    assert nodes["b"].reset_argv() == ["/bin/echo", "{x}", "b"]
    assert nodes["c"].reset_argv() == ["ipmitool", "-H", "10.0.0.3", "power", "reset"]
    assert NodeSpec(name="d", host="h").reset_argv() is None


def test_reset_runs_on_the_controller(tmp_path: Path) -> None:
    marker = tmp_path / "reset"
    n, _ = node({}, reset_command=f"touch {marker}-{{name}}")
    assert n.can_reset
    n.reset()
    assert (tmp_path / "reset-n1").exists()
    n, _ = node({}, reset_command="false")
    with pytest.raises(NodeError, match="exited 1"):
        n.reset()
    n, _ = node({})
    assert not n.can_reset
    with pytest.raises(NodeError, match="no reset_command"):
        n.reset()


def test_lock_speaks_the_protocol_of_the_nodes_helper() -> None:
    """Protocol 3 gets the token, the holder and the compare-and-swap of the held lock; a node
    still on an image from before gets what its helper knows."""
    ok = {"ok": True, "lock": {}}
    held = {"rollout": "r-1", "owner": "x@y", "token": "sha256-0123", "time": 0}
    n, t = node({"status": [{**STATUS, "protocol": 3}], "lock": [ok, ok], "unlock": [ok]})
    n.lock(CLAIM, take_over=held)
    assert t.calls[-1] == ["imagetool-node", "lock", "r-2", "--owner", "me@here", "--command", "imagetool rollout",
                           "--token", "c" * 32, "--holder", HOLDER_JSON,
                           "--take-over", "r-1", "--take-over-token", "sha256-0123"]
    # An unreadable lock has no rollout: it is named by its token alone.
    n.lock(CLAIM, take_over={"rollout": None, "unreadable": "empty", "token": "sha256-ffff"})
    assert t.calls[-1][-2:] == ["--take-over-token", "sha256-ffff"] and "--take-over" not in t.calls[-1]
    n.unlock(CLAIM)
    assert t.calls[-1] == ["imagetool-node", "unlock", "r-2", "--token", "c" * 32]

    old_status = {k: v for k, v in STATUS.items() if k != "protocol"}
    n, t = node({"status": [old_status], "lock": [ok], "unlock": [ok]})
    n.status()
    n.lock(CLAIM, take_over=held)
    assert t.calls[-1] == ["imagetool-node", "lock", "r-2", "--owner", "me@here", "--command", "imagetool rollout",
                           "--break-older-than", "0"]
    n.unlock(CLAIM)
    assert t.calls[-1] == ["imagetool-node", "unlock", "r-2"]
    n, t = node({"status": [{**STATUS, "protocol": 2}], "lock": [ok]})
    n.status()
    n.lock(CLAIM, take_over=held)
    assert t.calls[-1] == ["imagetool-node", "lock", "r-2", "--owner", "me@here", "--command", "imagetool rollout",
                           "--take-over", "r-1", "--pid", "77"]


def test_protocol_is_asked_before_it_is_used() -> None:
    """lock without an earlier status (stage and gc lock first): the node is asked, not assumed
    to speak protocol 1, so the helper gets the token and holder it understands."""
    ok = {"ok": True, "lock": {}}
    n, t = node({"status": [{**STATUS, "protocol": 3}], "lock": [ok], "unlock": [ok]})
    under_lock(n, "stage-1", "me@here", "imagetool stage", lambda _: None)
    assert [c[1] for c in t.calls] == ["status", "lock", "unlock"]
    lock, unlock = t.calls[1], t.calls[2]
    assert lock[:7] == ["imagetool-node", "lock", "stage-1", "--owner", "me@here", "--command", "imagetool stage"]
    token = lock[lock.index("--token") + 1]
    holder = json.loads(lock[lock.index("--holder") + 1])
    assert holder["pid"] == os.getpid() and unlock == ["imagetool-node", "unlock", "stage-1", "--token", token]
    n.lock(CLAIM)
    assert [c[1] for c in t.calls].count("status") == 1  # asked once


def test_a_lock_that_is_not_an_object_reads_as_unreadable() -> None:
    """An older helper reports its lock file's JSON as it is: a list is a broken lock, not a crash."""
    assert NodeStatus.from_answer("n1", {**STATUS, "lock": [1]}).lock == {
        "rollout": None, "owner": None, "time": 0, "unreadable": "the node's lock file holds a JSON list, not an object"}
    assert NodeStatus.from_answer("n1", {**STATUS, "lock": None}).lock is None
