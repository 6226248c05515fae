from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from imagetool.errors import InputError
from imagetool.schema import Where
from rollout.checks import (
    KINDS,
    CheckKind,
    CheckResult,
    CheckSpec,
    attempt,
    check_keys,
    cli_checks,
    parse_checks,
    register,
)


def test_kinds_are_registered_by_their_yaml_key() -> None:
    assert list(KINDS) == ["command", "tcp", "http"]
    assert check_keys() == ("name", "command", "tcp", "http", "expect_status", "timeout", "retries", "interval")


def test_cli_checks_keep_flag_order_and_names() -> None:
    checks = cli_checks(http=["http://{host}:8080/health=204", "https://x/"], tcp=["{host}:5432"], command=["true"])
    assert checks == [
        CheckSpec("cli-http-1", "http", "http://{host}:8080/health", expect_status=204),
        CheckSpec("cli-http-2", "http", "https://x/"),
        CheckSpec("cli-tcp-1", "tcp", "{host}:5432"),
        CheckSpec("cli-command-1", "command", "true"),
    ]


@pytest.mark.parametrize("flags,message", [
    ({"http": ["ftp://x/"]}, r"--check-http 'ftp://x/': expected an http:// or https:// URL, optionally =STATUS"),
    ({"http": ["http://x/=700"]}, r"--check-http 'http://x/=700': 700 is not an HTTP status"),
    ({"tcp": ["host"]}, r"--check-tcp 'host': expected HOST:PORT, e.g. '\{host\}:22'"),
    ({"command": ["  "]}, r"--check-command: the command is empty"),
])
def test_cli_check_errors(flags: dict[str, list[str]], message: str) -> None:
    with pytest.raises(InputError, match=message):
        cli_checks(**flags)


def test_inventory_and_cli_share_target_rules() -> None:
    with pytest.raises(InputError, match=r"^i.yaml: health_checks.x.tcp: 'host': expected HOST:PORT"):
        parse_checks([{"name": "x", "tcp": "host"}], Where("i.yaml", ("health_checks",), style="path"))


@dataclass
class _Ran:
    ok: bool
    exit_status: int
    stdout: str = ""
    stderr: str = ""


class _Node:
    name = "n1"

    def __init__(self) -> None:
        self.commands: list[tuple[str, float]] = []

    def run_shell(self, script: str, *, timeout: float = 60) -> _Ran:
        self.commands.append((script, timeout))
        return _Ran(ok=script == "true", exit_status=0 if script == "true" else 1, stdout="out")


def test_command_probe_runs_on_the_node() -> None:
    node = _Node()
    ok = attempt(node, CheckSpec("c", "command", "true", timeout=7))  # type: ignore[arg-type]
    bad = attempt(node, CheckSpec("c", "command", "false"))  # type: ignore[arg-type]
    assert node.commands == [("true", 7), ("false", 5)]
    assert ok.ok and ok.detail == "`true`: exit status 0"
    assert not bad.ok and bad.output == "out"


@pytest.fixture
def http_server() -> Iterator[int]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            code = int(self.path.strip("/") or 200)
            self.send_response(code)
            self.end_headers()
            self.wfile.write(b"body")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


def test_http_probe(http_server: int) -> None:
    url = f"http://127.0.0.1:{http_server}"
    assert attempt(_Node(), CheckSpec("h", "http", f"{url}/200")).ok  # type: ignore[arg-type]
    assert attempt(_Node(), CheckSpec("h", "http", f"{url}/503", expect_status=503)).ok  # type: ignore[arg-type]
    r = attempt(_Node(), CheckSpec("h", "http", f"{url}/500"))  # type: ignore[arg-type]
    assert not r.ok and r.detail.endswith("status 500 (expected 200)") and r.output == "body"


def test_tcp_probe(http_server: int) -> None:
    assert attempt(_Node(), CheckSpec("t", "tcp", f"127.0.0.1:{http_server}")).ok  # type: ignore[arg-type]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    r = attempt(_Node(), CheckSpec("t", "tcp", f"127.0.0.1:{closed}", timeout=2))  # type: ignore[arg-type]
    assert not r.ok and r.detail.startswith(f"tcp 127.0.0.1:{closed}: ")


def test_a_new_kind_is_one_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("rollout.checks.KINDS", dict(KINDS))

    @register
    class FileCheck(CheckKind):
        key = "file"
        shell = True

        @classmethod
        def probe(cls, node, check):  # type: ignore[no-untyped-def]
            return CheckResult(check.name, True, f"{check.target} exists")

    (check,) = parse_checks([{"name": "f", "file": "/var/lib/{name}", "retries": 1}],
                            Where("i.yaml", ("health_checks",), style="path"))
    assert check == CheckSpec("f", "file", "/var/lib/{name}", retries=1)
    assert cli_checks(file=["/x"]) == [CheckSpec("cli-file-1", "file", "/x")]
    assert attempt(_Node(), check).detail == "/var/lib/{name} exists"  # type: ignore[arg-type]


# --- placeholders in shell commands: one quoted word, or refused -------------------------------


@pytest.mark.parametrize("command", ['echo "{vars.x}"', "echo '{vars.x}'", 'test "a{host}b" = x',
                                     "sh <<EOF\necho {vars.x}\nEOF", "cat <<-X\n{name}\nX"])
def test_placeholders_where_quoting_cannot_hold_are_refused(command: str) -> None:
    with pytest.raises(InputError, match=r"health_checks.x.command: .*(quotes|here-document)"):
        parse_checks([{"name": "x", "command": command}], Where("i.yaml", ("health_checks",), style="path"))
    with pytest.raises(InputError, match="--check-command"):
        cli_checks(command=[command])


@pytest.mark.parametrize("command", ["echo {vars.x}", "printf '%s\\n' {vars.x} | grep -q .",
                                     "awk '{print $1}' /etc/hostname", 'test "$(hostname)" = {name}',
                                     "echo \\\"{vars.x}"])
def test_unquoted_placeholders_are_accepted(command: str) -> None:
    parse_checks([{"name": "x", "command": command}], Where("i.yaml", ("health_checks",), style="path"))


@pytest.mark.parametrize("value", ['"; touch {p}; "', "'; touch {p}; '", "$(touch {p})", "`touch {p}`",
                                   "x\ntouch {p}", "a b; touch {p}"])
def test_a_var_never_runs_as_a_command(tmp_path, value: str) -> None:  # type: ignore[no-untyped-def]
    import subprocess

    from rollout.nodespec import NodeSpec

    pwned = tmp_path / "pwned"
    node = NodeSpec(name="n1", host="10.0.0.1", vars={"x": value.format(p=pwned)})
    [check] = parse_checks([{"name": "x", "command": "echo {vars.x} >/dev/null"}],
                           Where("i.yaml", ("health_checks",), style="path"))
    target = check.for_node(node).target
    subprocess.run(["/bin/sh", "-c", target], check=True)
    assert not pwned.exists(), target


def test_values_with_spaces_cannot_reach_urls() -> None:
    from rollout.nodespec import NodeSpec

    [check] = parse_checks([{"name": "x", "http": "http://{host}/{vars.path}"}],
                           Where("i.yaml", ("health_checks",), style="path"))
    with pytest.raises(InputError, match="spaces or control characters"):
        check.for_node(NodeSpec(name="n1", host="h", vars={"path": "a\r\nHost: evil"}))
    assert check.for_node(NodeSpec(name="n1", host="h", vars={"path": "health"})).target == "http://h/health"
