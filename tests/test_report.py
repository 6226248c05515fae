"""`imagetool report`: the page drawn from journals that real rollouts wrote (local machines running
the real node helper, tests/report_runs.py): one with a node whose health gate fails with hostile
output and is rolled back, one whose controller is killed mid-batch. The page is then opened in a
real headless Chromium (tests/browser.py) to check what it shows."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import pytest
from click.testing import CliRunner

from imagetool.cli import main
from imagetool.errors import InputError
from imagetool.store import Store
from rollout.journal import find_record
from rollout.report import LABEL_W, PHASES, PLOT_W, NodeRow, _sent, build_report, esc, render_html
from rollout.update import RolloutResult
from tests.browser import Browser, chromium
from tests.report_runs import HOSTILE, NEW, OLD, failing_rollout, rollback

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Runs:
    state: Path
    store: Path
    failing: RolloutResult


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    """Journaled runs on local machines, in this order: `r-killed` (the controller killed
    mid-batch), `r-fail` (n3 rolled back) and `r-back` (a rollback of n1 and n2)."""
    base = tmp_path_factory.mktemp("report")
    state = base / "state"
    killed = subprocess.run([sys.executable, "-m", "tests.report_runs", str(base / "killed"), str(state), "r-killed"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr
    # Power off the killed controller's machines: their dead-man switches (in process groups of
    # their own, waiting out the confirm timeout) outlived it.
    for pid in (base / "killed" / "deadman.pids").read_text().split():
        try:
            os.killpg(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("rollout.node.BOOT_POLL_INTERVAL", 0.02)  # local machines reboot at once
        result, machines = failing_rollout(base / "fail", state, "r-fail")
        back = rollback(machines[:2], state, "r-back")
    assert [r.outcome for r in back.nodes] == ["done", "done"]
    for m in machines:
        m.power_off()
    return Runs(state, base / "fail" / "store", result)


def report(runs: Runs, rollout_id: str, output: Path, *extra: str) -> dict:
    r = CliRunner().invoke(main, ["report", rollout_id, "-o", str(output), "--store", str(runs.store), "--json",
                                  *extra], env={"IMAGETOOL_STATE_DIR": str(runs.state)})
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


class Tags(HTMLParser):
    """Every element of a page, as the browser's parser would open it."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)


def test_report_of_a_rollout_with_a_failed_node(runs: Runs, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    summary = report(runs, "r-fail", out)
    assert summary["output"] == str(out.resolve()) and out.is_file()
    assert (summary["state"], summary["target"], summary["previous"]) == ("exit 3", NEW, [OLD])
    assert summary["outcomes"] == {"done": 3, "rolled-back": 1}
    assert summary["bytes_sent"] == runs.failing.bytes_sent > 0

    rep = build_report(find_record(runs.state, "r-fail"), Store(runs.store))
    rows = {r.name: r for r in rep.rows}
    for result in runs.failing.nodes:  # the journal tells what the run returned
        assert (rows[result.node].outcome, rows[result.node].bytes_sent) == (result.outcome, result.bytes_sent)
    assert [p.name for p in rows["n3"].phases] == ["prepare", "stage", "reboot", "health", "rollback"]
    assert [p.name for p in rows["n1"].phases] == ["prepare", "stage", "reboot", "health", "commit"]
    for row in rep.rows:
        assert all(a.end <= b.start + 1e-9 for a, b in zip(row.phases, row.phases[1:], strict=False)), row
        assert not any(p.open for p in row.phases)
    assert [b.label for b in rep.batches] == ["batch 1 (canary)", "batch 2", "batch 3"]
    assert rep.batches[0].start < rep.batches[1].start < rep.batches[2].start
    # The evidence: the failing gate on NEW, its checks, the failing one's output as the node said it.
    [gate] = rows["n3"].failed_gates
    assert gate.image == NEW
    app = next(c for c in gate.checks if c.name == "app")
    assert not app.ok and HOSTILE in app.output and "second line" in app.output
    assert "health gate failed" in rows["n3"].reason
    [diff] = rep.diffs
    assert (diff.added, diff.removed, diff.upgraded) == ([("curl", "7.88.1-10")], [("nano", "7.2-1")],
                                                         [("bash", "5.2.15-2", "5.2.15-2+b2")])


def test_bytes_sent_say_how_the_image_travelled() -> None:
    assert _sent(NodeRow("n1", bytes_sent=1024, transfer="delta", image_bytes=4096)) == "1.0 KiB (delta of 4.0 KiB)"
    assert _sent(NodeRow("n1", bytes_sent=4096, transfer="full", image_bytes=4096)) == "4.0 KiB"
    assert _sent(NodeRow("n1")) == "–"  # a journal from before the stage event


def test_text_from_nodes_is_escaped(runs: Runs, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    report(runs, "r-fail", out)
    page = out.read_text()
    assert "<script" not in page.lower() and page.count("</svg>") == 1
    assert esc(HOSTILE) in page
    parser = Tags()
    parser.feed(page)
    assert "script" not in parser.tags and "b" not in parser.tags
    assert parser.tags.count("svg") == 1
    # Attributes too: a hostile node name stays inside its quotes.
    assert esc('n"><script>') == "n&quot;&gt;&lt;script&gt;" and esc("\x1b[31m") == "\\x1b[31m"


def test_report_of_an_interrupted_run(runs: Runs, tmp_path: Path) -> None:
    summary = report(runs, "r-killed", tmp_path / "killed.html")
    assert summary["state"] == "interrupted" and summary["ended"] is None
    rep = build_report(find_record(runs.state, "r-killed"))
    rows = {r.name: r for r in rep.rows}
    assert rows["n1"].outcome == "done"
    # n2 was in its health gate (its check takes 10 s) when n3 began its commit and the controller died.
    assert (rows["n2"].outcome, rows["n3"].outcome) == ("interrupted", "interrupted")
    last = rows["n2"].phases[-1]
    assert (last.name, last.open, last.end) == ("health", True, rep.duration) and last.end > last.start
    assert rows["n3"].phases[-1].name == "commit" and rows["n3"].phases[-1].open
    page = (tmp_path / "killed.html").read_text()
    assert 'data-state="interrupted"' in page and "Interrupted: the journal has no end" in page


def test_report_of_a_rollback(runs: Runs, tmp_path: Path) -> None:
    summary = report(runs, "r-back", tmp_path / "back.html")
    assert (summary["kind"], summary["target"], summary["previous"]) == ("rollback", None, [NEW])
    assert summary["state"] == "ok" and summary["outcomes"] == {"done": 2} and summary["bytes_sent"] == 0
    rep = build_report(find_record(runs.state, "r-back"), Store(runs.store))
    assert [(r.name, r.from_id, r.to_id) for r in rep.rows] == [("n1", NEW, OLD), ("n2", NEW, OLD)]
    assert [p.name for p in rep.rows[0].phases] == ["prepare", "reboot", "health", "commit"]
    [diff] = rep.diffs  # the way back: what the rollback took away and brought back
    assert (diff.before, diff.after, diff.added, diff.removed) == (NEW, OLD, [("nano", "7.2-1")],
                                                                   [("curl", "7.88.1-10")])
    page = (tmp_path / "back.html").read_text()
    assert "rollback r-back → previous images" in page and "No node failed." in page


def test_a_run_again_under_the_same_id(runs: Runs) -> None:
    """`rollout --rollout-id` after a killed controller appends to the same journal: the first
    run's open phases stop where its journal stopped, the second run's are drawn after it."""
    journals = runs.state / "rollouts"
    both = journals / "r-again.jsonl"
    both.write_bytes((journals / "r-killed.jsonl").read_bytes() + (journals / "r-fail.jsonl").read_bytes())
    try:
        killed = build_report(find_record(runs.state, "r-killed"))
        rep = build_report(find_record(runs.state, "r-again"))
    finally:
        both.unlink()
    [again] = rep.resumed_at
    assert again > killed.duration
    rows = {r.name: r for r in rep.rows}
    first_run = [p for p in rows["n2"].phases if p.start < again]
    assert first_run[-1].open and first_run[-1].end == pytest.approx(killed.duration, abs=1e-6)
    assert all(not p.open for p in rows["n2"].phases if p.start >= again)
    assert rows["n3"].outcome == "rolled-back" and rep.state == "exit 3"
    assert [b.label for b in rep.batches] == ["batch 1 (canary)", "batch 2", "batch 1 (canary)", "batch 2",
                                              "batch 3"]


def test_release_diff_needs_the_store(runs: Runs, tmp_path: Path) -> None:
    empty = tmp_path / "empty-store"
    empty.mkdir()
    report(runs, "r-fail", tmp_path / "a.html", "--store", str(empty))
    page = (tmp_path / "a.html").read_text()
    assert "Release diff not available: release web-1.0 is not in store" in page
    rep = build_report(find_record(runs.state, "r-fail"), None)
    assert rep.diffs == [] and "no release store given" in (rep.diff_note or "")
    assert "no release store given" in render_html(rep)


def test_bad_input_is_a_clear_error(runs: Runs, tmp_path: Path) -> None:
    env = {"IMAGETOOL_STATE_DIR": str(runs.state)}
    r = CliRunner().invoke(main, ["report", "r-nothing", "-o", str(tmp_path / "x.html")], env=env)
    assert r.exit_code == 2 and "no rollout 'r-nothing'" in r.output
    r = CliRunner().invoke(main, ["report", "r-fail", "-o", str(tmp_path / "no" / "x.html")], env=env)
    assert r.exit_code == 2 and "cannot write" in r.output and not (tmp_path / "no").exists()
    torn = runs.state / "rollouts" / "r-torn.jsonl"
    torn.write_text('{"time": "2026-11-2')
    try:
        with pytest.raises(InputError, match="no events to report on"):
            build_report(find_record(runs.state, "r-torn"))
    finally:
        torn.unlink()


PHASE_GEOMETRY = """(() => {
  const box = e => { const r = e.getBoundingClientRect();
                     return {x: r.x + scrollX, y: r.y + scrollY, w: r.width, h: r.height}; };
  const svg = box(document.querySelector('svg#timeline'));
  return {
    svg,
    phases: [...document.querySelectorAll('rect.phase')].map(e => ({node: e.dataset.node, phase: e.dataset.phase,
             start: parseFloat(e.dataset.start), open: e.classList.contains('open'), ...box(e)})),
    batches: [...document.querySelectorAll('line.batch-marker')].map(e => ({label: e.dataset.label, ...box(e)})),
    labels: [...document.querySelectorAll('text.batch-label')].map(e => e.textContent),
    scripts: document.querySelectorAll('script').length,
    evidence: document.querySelector('#evidence').innerText,
    evidenceBox: box(document.querySelector('#evidence')),
    injected: document.querySelectorAll('#evidence b, svg script').length,
    rows: [...document.querySelectorAll('#nodes tbody tr')].map(tr => [...tr.cells].map(c => c.innerText)),
    banner: document.querySelector('.banner').innerText,
  };
})()"""


@pytest.mark.skipif(chromium() is None, reason="chromium is not installed (scripts/setup installs it)")
def test_the_page_in_a_real_browser(runs: Runs, tmp_path: Path) -> None:
    report(runs, "r-fail", tmp_path / "fail.html")
    report(runs, "r-killed", tmp_path / "killed.html")
    with Browser(tmp_path / "profile") as browser:
        browser.open((tmp_path / "fail.html").as_uri())
        page = browser.evaluate(PHASE_GEOMETRY)
        assert page["scripts"] == 0 and page["injected"] == 0
        # The failing check's output is shown as text, exactly as the node printed it.
        assert HOSTILE in page["evidence"] and "n3: rolled-back" in page["evidence"]
        assert page["evidenceBox"]["h"] > 50
        assert page["labels"] == ["batch 1 (canary)", "batch 2", "batch 3"]
        markers = page["batches"]
        assert len(markers) == 3 and markers[0]["x"] < markers[1]["x"] < markers[2]["x"]
        by_node: dict[str, list[dict]] = {}
        for p in page["phases"]:
            by_node.setdefault(p["node"], []).append(p)
        assert sorted(by_node) == ["n1", "n2", "n3", "n4"]
        svg = page["svg"]
        for node, phases in by_node.items():
            # Left to right in time order, one row per node, inside the drawing.
            assert [p["start"] for p in phases] == sorted(p["start"] for p in phases)
            assert all(a["x"] < b["x"] for a, b in zip(phases, phases[1:], strict=False)), node
            assert len({round(p["y"]) for p in phases}) == 1
            assert all(svg["x"] <= p["x"] and p["x"] + p["w"] <= svg["x"] + svg["w"] for p in phases)
        rows = sorted({round(ps[0]["y"]) for ps in by_node.values()})
        assert rows == [round(by_node[n][0]["y"]) for n in ("n1", "n2", "n3", "n4")]
        # A node's activation starts at its batch's marker.
        for node, batch in (("n1", 0), ("n2", 1), ("n3", 2), ("n4", 2)):
            reboot = next(p for p in by_node[node] if p["phase"] == "reboot")
            assert abs(reboot["x"] - markers[batch]["x"]) < 2, (node, reboot, markers[batch])
        assert [p["phase"] for p in by_node["n3"]][-2:] == ["health", "rollback"]
        assert not any(p["phase"] == "rollback" for n in ("n1", "n2", "n4") for p in by_node[n])
        # The failed node's rollback is drawn in the failure colour where its rect is: after n4's commit began.
        rollback = by_node["n3"][-1]
        _, _, pixels = browser.screenshot(rollback["x"] + rollback["w"] / 2 - 1, rollback["y"] + rollback["h"] / 2 - 1,
                                          2, 2)
        red = bytes.fromhex(PHASES["rollback"][1][1:])
        assert all(abs(a - b) <= 3 for a, b in zip(pixels[0][:3], red, strict=False)), pixels[0][:3]
        commit = next(p for p in by_node["n1"] if p["phase"] == "commit")
        _, _, pixels = browser.screenshot(commit["x"] + commit["w"] / 2 - 1, commit["y"] + commit["h"] / 2 - 1, 2, 2)
        assert abs(pixels[0][0] - red[0]) > 60  # a node that succeeded shows no failure colour
        table = {r[0]: r for r in page["rows"]}
        assert table["n3"][2] == "rolled-back" and table["n1"][2] == "done" and "KiB" in table["n1"][3]

        browser.open((tmp_path / "killed.html").as_uri())
        page = browser.evaluate(PHASE_GEOMETRY)
        assert page["banner"].startswith("Interrupted")
        open_phases = [p for p in page["phases"] if p["open"]]
        assert {p["node"] for p in open_phases} == {"n2", "n3"}
        plot_end = svg["x"] + LABEL_W + PLOT_W
        # Drawn up to the last event, the right end of the time axis.
        for p in open_phases:
            assert abs(p["x"] + p["w"] - plot_end) < 2.5, p
        n2 = next(p for p in open_phases if p["node"] == "n2")
        assert n2["phase"] == "health" and n2["w"] >= 2
