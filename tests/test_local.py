"""The local machine and its transport (rollout.local): firmware, reboots, the dead-man switch and
file transfer around the real node helper."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imagetool.errors import InputError, NodeError, UnreachableError
from imagetool.store import StoredRelease
from rollout.local import LocalMachine, LocalTransport
from rollout.node import BootTimeoutError, HelperNode
from rollout.stage import stage
from tests.local_fleet import NEW, OLD, Fleet, actions, boot_into, fast_boot_polls, fleet, machine, release, state  # noqa: F401 - fixtures


def test_boots_the_committed_image_with_its_release_and_a_fresh_boot_id(fleet: Fleet) -> None:
    [n] = fleet(1)
    m = machine(n)
    st = n.status()
    assert (st.booted, st.default, st.committed, st.system_state) == (OLD, OLD, OLD, "running")
    release_json = json.loads((m.root / "etc/imagetool/release.json").read_text())
    assert (release_json["name"], release_json["version"]) == ("web", "1.0")
    assert st.boot_id == m.boot_id and (m.dir / "boot_id").read_text().strip() == m.boot_id
    assert st.trial is None  # the default image: the dead-man switch has nothing to watch


def test_one_shot_boot_is_consumed_and_a_reset_falls_back_to_the_default(release: StoredRelease,
                                                                          fleet: Fleet) -> None:
    [n] = fleet(1)
    m = machine(n)
    boot_into(n, release, "r-1")
    st = n.status()
    assert (st.booted, st.default, st.next) == (NEW, OLD, None)  # consumed before the boot
    assert st.trial and st.trial["id"] == NEW and not st.trial["confirmed"]
    assert m.node_var.read_control()["last_one_shot"] == NEW
    old_boot = st.boot_id
    m.reset()
    st = n.wait_for_boot(old_boot, 10)
    assert (st.booted, st.default, st.committed) == (OLD, OLD, OLD)


def test_a_missing_one_shot_image_boots_the_default(fleet: Fleet) -> None:
    [n] = fleet(1)
    m = machine(n)
    m.node_var.write_lab_control(default=OLD, next_id="web-9")
    m.reset()
    assert m.booted == OLD and m.node_var.read_control()["next"] is None


def test_reboot_asked_through_the_helper_comes_back_with_a_new_boot(fleet: Fleet) -> None:
    [n] = fleet(1)
    m = machine(n)
    old = n.reboot()
    assert m.boots == 1  # not before anyone looks: the machine runs the helper's reboot timer then
    st = n.wait_for_boot(old, 10)
    assert st.boot_id != old and m.boots == 2 and st.booted == OLD


def test_reboot_timer_waits_for_its_delay(tmp_path: Path, fleet: Fleet) -> None:
    [n] = fleet(1)
    m = machine(n)
    m.timer_delay = None  # as asked: systemd-run --on-active=1
    old = n.reboot()
    assert n.status().boot_id == old  # the answer got out, the reboot is a second later
    assert n.wait_for_boot(old, 10).boot_id != old


def test_dead_man_switch_reboots_an_unconfirmed_trial_into_the_default(release: StoredRelease,
                                                                        fleet: Fleet) -> None:
    [n] = fleet(1)
    m = machine(n)
    m.hangs_on.add(NEW)  # the image never answers, but its dead-man switch runs
    stage(n, release)
    n.set_next(NEW, 1, "r-1")
    old = n.reboot()
    with pytest.raises(BootTimeoutError):
        n.wait_for_boot(old, 0.5)
    assert m.booted == NEW
    st = n.wait_for_boot(old, 10)
    assert st.booted == OLD and m.boots == 3
    assert actions(n, "boot") == [("boot", OLD), ("boot", NEW), ("boot", OLD)]
    assert "was not confirmed within 1s" in (m.dir / "console.log").read_text()


def test_confirmed_trial_stays(release: StoredRelease, fleet: Fleet) -> None:
    [n] = fleet(1)
    boot_into(n, release, "r-1", confirm_timeout=1)
    n.confirm(NEW)
    n.commit(NEW, "r-1")
    m = machine(n)
    m._deadman.wait(5)  # type: ignore[union-attr] - the switch ends once its boot is confirmed
    assert n.status().booted == NEW and m.boots == 2


def test_power_and_network_faults_are_unreachable(fleet: Fleet) -> None:
    [n] = fleet(1)
    m = machine(n)
    m.network_cut = True
    with pytest.raises(UnreachableError, match="node n1 .*cannot connect"):
        n.status()
    m.network_cut = False
    assert n.status().booted == OLD
    m.power_off()
    with pytest.raises(UnreachableError):
        n.status()
    m.power_on()
    assert n.status().booted == OLD
    m.reset()
    with pytest.raises(UnreachableError, match="connection lost"):  # it died with its boot
        n.status()
    assert n.status().booted == OLD


def test_faults_before_a_command(fleet: Fleet) -> None:
    [n] = fleet(1)
    m = machine(n)
    m.faults["clear-next"] = UnreachableError("node n1: connection reset")
    with pytest.raises(UnreachableError, match="connection reset"):
        n.clear_next()
    m.faults["clear-next"] = "Traceback (most recent call last):\nOSError: I/O error"
    with pytest.raises(NodeError, match=r"(?s)gave no answer .*I/O error"):
        n.clear_next()


def test_system_state_per_image_reaches_the_health_answer(fleet: Fleet) -> None:
    [n] = fleet(1)
    m = machine(n)
    m.system_state[OLD] = "degraded"
    m.failed_units[OLD] = ["app.service"]
    m.reset()
    n.transport.close()
    doc = n.health()
    assert not doc["healthy"]
    [check] = doc["checks"]
    assert check["detail"] == "systemctl is-system-running: degraded" and "app.service" in check["output"]


def put(n: HelperNode, local: Path, remote: str, offset: int = 0) -> int:
    return n.transport.put_file(local, remote, offset=offset)


def test_put_file_truncates_appends_and_resumes(tmp_path: Path, fleet: Fleet) -> None:
    [n] = fleet(1)
    m = machine(n)
    src = tmp_path / "data"
    src.write_bytes(bytes(range(256)) * 40)
    seen: list[int] = []
    assert n.transport.put_file(src, "/var/tmp-data", progress=seen.append) == 10240 and seen == [10240]
    target = m.root / "var/tmp-data"
    assert target.read_bytes() == src.read_bytes()
    target.write_bytes(src.read_bytes()[:1000])  # a transfer cut short
    assert put(n, src, "/var/tmp-data", offset=1000) == 9240
    assert target.read_bytes() == src.read_bytes()
    assert put(n, src, "/var/tmp-data") == 10240 and target.stat().st_size == 10240  # offset 0 truncates
    with pytest.raises(InputError, match="outside the file"):
        put(n, src, "/var/tmp-data", offset=10241)
    with pytest.raises(NodeError, match="Directory nonexistent"):
        put(n, src, "/var/no/such/dir/x")
    assert actions(n, "put")[0] == ("put", "/var/tmp-data")


def test_put_file_fills_the_disk_like_cat(tmp_path: Path, fleet: Fleet) -> None:
    [n] = fleet(1)
    m = machine(n)
    src = tmp_path / "data"
    src.write_bytes(b"z" * 5000)
    m.set_free_bytes(3000)
    assert n.stage_info(NEW).free_bytes == 3000  # what the helper sees of the disk
    with pytest.raises(NodeError, match=r"stopped reading after 3000 bytes \(exit status 1\): .*No space left"):
        put(n, src, "/var/lib/imagetool/images/.incoming/x")
    assert n.stage_info(NEW).free_bytes == 0


def test_reset_command_of_the_inventory_entry_resets_the_machine(release: StoredRelease, fleet: Fleet) -> None:
    [n] = fleet(1, reset=True)
    m = machine(n)
    m.hangs_on.add(NEW)
    stage(n, release)
    n.set_next(NEW, 300, "r-1")
    old = n.reboot()
    with pytest.raises(BootTimeoutError):
        n.wait_for_boot(old, 0.3)
    assert n.can_reset
    n.reset()  # runs the spec's reset_command, as for any node
    assert n.wait_for_boot(old, 10).booted == OLD
    assert actions(n, "reset") == [("reset", "")]


def test_transport_is_a_transport(tmp_path: Path) -> None:
    from rollout.transport import Transport

    m = LocalMachine(tmp_path / "m")
    try:
        assert isinstance(LocalTransport(m), Transport)
        with pytest.raises(UnreachableError):  # nothing installed, never powered on
            LocalTransport(m).run(["true"])
    finally:
        m.power_off()
