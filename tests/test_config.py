"""Configuration loading, ``--check``, and the example file."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from protocols.registry import PROTOCOLS
from starttls_proxy.cli import main
from starttls_proxy.config import SYSTEM_TRUST, Protocol, load_config
from starttls_proxy.proxy.server import session_settings
from starttls_proxy.settings import ConfigError
from tests.realservers import demo

ROOT = Path(__file__).resolve().parent.parent


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def _minimal(cert_dir: Path, **listener: object) -> dict[str, object]:
    entry: dict[str, object] = {
        "name": "smtp",
        "protocol": "smtp",
        "listen": "127.0.0.1:2525",
        "backend": {"address": "127.0.0.1:10025"},
    }
    entry.update(listener)
    return {
        "tls": {
            "certificates": [{"cert": str(cert_dir / "cert.pem"), "key": str(cert_dir / "key.pem")}]
        },
        "listeners": [entry],
    }


def test_minimal_config_gets_defaults(cert_dir: Path, tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, yaml.safe_dump(_minimal(cert_dir))))
    listener = config.listeners[0]
    assert listener.require_tls is True
    assert listener.tls.value == "starttls"
    assert listener.fixed_backend.identity.value == "none"
    assert listener.session_idle == 300.0
    assert listener.max_line_length == 2048
    assert str(listener.listen) == "127.0.0.1:2525"
    assert config.isolation.spare_workers == 2
    assert listener.timeouts.pre_tls == 60.0
    assert listener.timeouts.command == 60.0
    assert listener.limits.max_connections_per_client == 50


@pytest.mark.parametrize(
    ("protocol", "limits", "expected"),
    [
        ("xmpp-client", {}, 256 * 1024),
        # s2s carries what the remote server's c2s limit let through, stamped.
        ("xmpp-server", {}, 512 * 1024),
        ("xmpp-server", {"max_stanza_size": 100_000}, 100_000),
    ],
)
def test_stanza_limit_defaults_per_protocol(
    cert_dir: Path, tmp_path: Path, protocol: str, limits: dict[str, int], expected: int
) -> None:
    raw = _minimal(cert_dir, protocol=protocol, limits=limits)
    listener = load_config(_write(tmp_path, yaml.safe_dump(raw))).listeners[0]
    assert listener.max_stanza_size == expected
    assert session_settings(listener, ()).max_stanza_size == expected


def test_pre_tls_idle_is_the_former_name_of_pre_tls(cert_dir: Path, tmp_path: Path) -> None:
    raw = _minimal(cert_dir, timeouts={"pre_tls_idle": 7})
    assert load_config(_write(tmp_path, yaml.safe_dump(raw))).listeners[0].timeouts.pre_tls == 7


@pytest.mark.parametrize(
    ("spare_workers", "expected"),
    [
        (-1, "isolation.spare_workers: Input should be greater than or equal to 0"),
        (257, "isolation.spare_workers: Input should be less than or equal to 256"),
    ],
)
def test_spare_workers_are_bounded(
    cert_dir: Path, tmp_path: Path, spare_workers: int, expected: str
) -> None:
    document = {**_minimal(cert_dir), "isolation": {"spare_workers": spare_workers}}
    with pytest.raises(ConfigError) as caught:
        load_config(_write(tmp_path, yaml.safe_dump(document)))
    assert any(problem.startswith(expected) for problem in caught.value.problems), caught.value


@pytest.mark.parametrize(
    ("listener", "expected"),
    [
        (
            {"backend": {"address": "nohost"}},
            "listeners[0].backend.address: Value error, expected host:port",
        ),
        ({"listen": "::1:25"}, "listeners[0].listen: Value error, IPv6 addresses need brackets"),
        ({"listen": "127.0.0.1:99999"}, "listeners[0].listen: Value error, port must be 1-65535"),
        ({"protocol": "gopher"}, "listeners[0].protocol: Input should be"),
        ({"tls": "sometimes"}, "listeners[0].tls: Input should be 'starttls' or 'implicit'"),
        ({"surprise": 1}, "listeners[0].surprise: Extra inputs are not permitted"),
        (
            {"backend": {"address": "unix:relative"}},
            "listeners[0].backend.address: Value error, unix socket path must be absolute",
        ),
        (
            {"limits": {"max_line_length": 10}},
            "listeners[0].limits.max_line_length: Input should be greater than or equal to 512",
        ),
        (
            {"alpn": ["x" * 200, "y" * 100]},
            "listeners[0].alpn: Value error, ALPN protocols take 302 bytes on the wire",
        ),
        ({"alpn": [""]}, "listeners[0].alpn: Value error, ALPN protocol ''"),
        (
            {"timeouts": {"handshake": 5e6}},
            "listeners[0].timeouts.handshake: Input should be less than or equal to 4294967.295",
        ),
    ],
)
def test_problems_name_their_yaml_path(
    cert_dir: Path, tmp_path: Path, listener: dict[str, object], expected: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(_write(tmp_path, yaml.safe_dump(_minimal(cert_dir, **listener))))
    assert any(problem.startswith(expected) for problem in caught.value.problems), caught.value


def test_unix_and_ipv6_addresses(cert_dir: Path, tmp_path: Path) -> None:
    raw = _minimal(cert_dir, listen="[::1]:2525", backend={"address": "unix:/run/postfix.sock"})
    listener = load_config(_write(tmp_path, yaml.safe_dump(raw))).listeners[0]
    assert (listener.listen.host, listener.listen.port) == ("::1", 2525)
    assert listener.fixed_backend.address.unix_path == "/run/postfix.sock"


def test_xclient_only_for_smtp_and_duplicates_refused(cert_dir: Path, tmp_path: Path) -> None:
    raw = _minimal(cert_dir)
    listeners = raw["listeners"]
    assert isinstance(listeners, list)
    listeners.append(dict(listeners[0]))
    with pytest.raises(ConfigError, match="listener name 'smtp' is used twice"):
        load_config(_write(tmp_path, yaml.safe_dump(raw)))


def test_check_reports_mismatched_pair(
    cert_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = _minimal(cert_dir)
    raw["tls"] = {
        "certificates": [
            {"cert": str(cert_dir / "cert.pem"), "key": str(cert_dir / "other-key.pem")}
        ]
    }
    path = _write(tmp_path, yaml.safe_dump(raw))
    assert main(["--config", str(path), "--check"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "tls.certificates[0].key: does not match the certificate" in err[0]


def test_check_passes_on_a_good_config(
    cert_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path, yaml.safe_dump(_minimal(cert_dir)))
    assert main(["--config", str(path), "--check"]) == 0
    assert capsys.readouterr().out.strip() == f"{path}: OK"


def test_unreadable_and_invalid_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(tmp_path / "absent.yaml"), "--check"]) == 2
    assert "cannot read" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("listeners: [\n")
    assert main(["--config", str(bad), "--check"]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_example_config_checks_as_shipped(tmp_path: Path) -> None:
    """config.example.yaml, with the certificate the run script generates."""
    shutil.copy(ROOT / "config.example.yaml", tmp_path / "config.yaml")
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "make-example-cert.py"),
            str(tmp_path / "example-certs"),
        ],
        check=True,
        capture_output=True,
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "starttls_proxy",
            "--config",
            str(tmp_path / "config.yaml"),
            "--check",
        ],
        capture_output=True,
        check=False,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr


def test_example_config_points_at_the_demo_servers() -> None:
    """scripts/run-example.sh starts its demo servers on these ports and prints
    commands for these listeners (tests/realservers/demo.py)."""
    listeners = yaml.safe_load((ROOT / "config.example.yaml").read_text())["listeners"]
    routes = {entry["name"]: (entry["listen"], entry["backend"]["address"]) for entry in listeners}
    postfix_plain, postfix_proxy, _ = demo.POSTFIX_PORTS
    dovecot_imap, _, _, dovecot_pop3_proxy = demo.DOVECOT_PORTS
    expected = {
        "smtp": (demo.SMTP_PORT, postfix_plain),
        "submissions": (demo.SUBMISSIONS_PORT, postfix_proxy),
        "imap": (demo.IMAP_PORT, dovecot_imap),
        "pop3": (demo.POP3_PORT, dovecot_pop3_proxy),
        "xmpp": (demo.XMPP_PORT, demo.PROSODY_PORT),
    }
    assert routes == {
        name: (f"127.0.0.1:{listen}", f"127.0.0.1:{backend}")
        for name, (listen, backend) in expected.items()
    }
    assert set(demo.PROXY_PORTS) == {listen for listen, _ in expected.values()}


def test_every_protocol_the_configuration_takes_has_a_machine() -> None:
    """What the removed ``_implemented`` validator could never find at run
    time, held where it can fail: a protocol added to the enum alone."""
    assert {protocol.value for protocol in Protocol} == set(PROTOCOLS)


def _s2s(cert_dir: Path, **listener: object) -> dict[str, object]:
    return _minimal(
        cert_dir,
        name="s2s",
        protocol="xmpp-server",
        listen="127.0.0.1:5269",
        backend={"address": "127.0.0.1:15269"},
        **listener,
    )


def test_server_to_server_listeners_verify_peers_against_the_system_store(
    cert_dir: Path, tmp_path: Path
) -> None:
    config = load_config(_write(tmp_path, yaml.safe_dump(_s2s(cert_dir))))
    peer = config.listeners[0].peer_certificates
    assert peer is not None
    assert (peer.trust, peer.on_failure.value) == ("system", "dialback")
    assert config.trust_stores == (SYSTEM_TRUST,)
    assert config.helper_tls.peer_trust == (SYSTEM_TRUST,)
    assert config.tls.peer_trust == ()
    # Other protocols ask for no certificate; null turns it off.
    assert load_config(_write(tmp_path, yaml.safe_dump(_minimal(cert_dir)))).trust_stores == ()
    off = load_config(_write(tmp_path, yaml.safe_dump(_s2s(cert_dir, peer_certificates=None))))
    assert off.listeners[0].peer_certificates is None and off.trust_stores == ()


def test_trust_files_are_relative_to_the_config_and_each_a_store_once(
    cert_dir: Path, tmp_path: Path
) -> None:
    raw = _s2s(cert_dir, peer_certificates={"trust": "peers.pem", "on_failure": "refuse"})
    second = dict(raw["listeners"][0])  # type: ignore[index]
    second.update(name="s2s-direct", listen="127.0.0.1:5270", tls="implicit")
    third = dict(second, name="s2s-system", listen="127.0.0.1:5271", peer_certificates={})
    raw["listeners"] = [*raw["listeners"], second, third]  # type: ignore[misc]
    config = load_config(_write(tmp_path, yaml.safe_dump(raw)))
    assert config.trust_stores == (tmp_path / "peers.pem", SYSTEM_TRUST)
    assert config.listeners[1].peer_certificates is not None
    assert config.listeners[1].peer_certificates.on_failure.value == "refuse"


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (
            lambda d: _minimal(d, peer_certificates={}),
            "listeners[0]: Value error, peer_certificates is for xmpp-server and xmpp-server-out",
        ),
        (
            lambda d: _s2s(d, require_tls=False, peer_certificates={"on_failure": "refuse"}),
            "listeners[0]: Value error, peer_certificates.on_failure: refuse needs require_tls",
        ),
        (
            lambda d: _s2s(d, peer_certificates={"on_failure": "ignore"}),
            "listeners[0].peer_certificates.on_failure: Input should be 'dialback' or 'refuse'",
        ),
        (
            lambda d: {**_s2s(d), "tls": {**_s2s(d)["tls"], "peer_trust": ["/x.pem"]}},  # type: ignore[dict-item]
            "tls: Value error, peer_trust comes from the listeners",
        ),
    ],
)
def test_peer_certificates_problems(cert_dir: Path, tmp_path: Path, raw: Any, problem: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_config(_write(tmp_path, yaml.safe_dump(raw(cert_dir))))
    assert any(line.startswith(problem) for line in refused.value.problems), refused.value.problems


def test_check_reads_the_trust_files(
    cert_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = _s2s(cert_dir, peer_certificates={"trust": str(tmp_path / "missing.pem")})
    path = _write(tmp_path, yaml.safe_dump(raw))
    assert main(["--config", str(path), "--check"]) == 2
    assert f"peer_certificates.trust: {tmp_path / 'missing.pem'}: file not found" in (
        capsys.readouterr().err
    )
    raw = _s2s(cert_dir, peer_certificates={"trust": str(cert_dir / "ca.pem")})
    assert main(["--config", str(_write(tmp_path, yaml.safe_dump(raw))), "--check"]) == 0


def _commented_example(name: str) -> list[object]:
    """The listener ``name`` that config.example.yaml shows commented out."""
    text = (ROOT / "config.example.yaml").read_text()
    start = text.index(f"  # - name: {name}\n")
    block = text[start : text.index("\n\n", start)]
    entries = yaml.safe_load(
        "\n".join(line.replace("  # ", "  ", 1) for line in block.splitlines())
    )
    assert isinstance(entries, list)
    return entries


def test_the_example_server_to_server_listeners_check_when_uncommented(
    cert_dir: Path, tmp_path: Path
) -> None:
    """config.example.yaml shows them commented out (no demo server federates)."""
    raw = _minimal(cert_dir)
    raw["listeners"] = _commented_example("xmpp-s2s") + _commented_example("xmpp-s2s-out")
    incoming, outgoing = load_config(_write(tmp_path, yaml.safe_dump(raw))).listeners
    peer = incoming.peer_certificates
    assert peer is not None and peer == type(peer)()
    assert outgoing.routes is not None
    assert list(outgoing.routes.static) == ["partner.example.net"]


def _outgoing(cert_dir: Path, **listener: object) -> dict[str, object]:
    raw = _minimal(cert_dir, name="s2s-out", protocol="xmpp-server-out", listen="127.0.0.1:5270")
    entry = raw["listeners"][0]  # type: ignore[index]
    del entry["backend"]
    entry.update(listener)
    return raw


def test_outgoing_listener_defaults(cert_dir: Path, tmp_path: Path) -> None:
    """An xmpp-server-out listener resolves by DNS with the system's name
    servers, verifies every remote against the system's CAs, and offers
    ALPN xmpp-server on direct TLS."""
    config = load_config(_write(tmp_path, yaml.safe_dump(_outgoing(cert_dir))))
    listener = config.listeners[0]
    assert listener.backend is None
    assert listener.routes is not None
    assert listener.routes.static == {}
    assert listener.routes.nameservers == ()
    assert listener.peer_certificates is not None
    assert listener.peer_certificates.trust == "system"
    assert listener.alpn_protocols == ("xmpp-server",)
    assert listener.max_stanza_size == 512 * 1024
    with pytest.raises(ValueError, match="has no backend"):
        _ = listener.fixed_backend


def test_outgoing_routes(cert_dir: Path, tmp_path: Path) -> None:
    raw = _outgoing(
        cert_dir,
        routes={
            "static": {
                "Chat.Example.": [
                    {"address": "192.0.2.1:5269"},
                    {"address": "[2001:db8::1]:5270", "tls": "implicit"},
                ]
            },
            "nameservers": ["127.0.0.1", "127.0.0.1:5353", "[::1]:53", "::1"],
        },
        domains=["example.org"],
    )
    listener = load_config(_write(tmp_path, yaml.safe_dump(raw))).listeners[0]
    assert listener.routes is not None
    routes = listener.routes.static["chat.example"]
    assert [(str(r.address), r.direct_tls) for r in routes] == [
        ("192.0.2.1:5269", False),
        ("[2001:db8::1]:5270", True),
    ]
    assert [str(server) for server in listener.routes.nameservers] == [
        "127.0.0.1:53",
        "127.0.0.1:5353",
        "[::1]:53",
        "[::1]:53",
    ]


@pytest.mark.parametrize(
    ("listener", "problem"),
    [
        ({"backend": {"address": "127.0.0.1:5269"}}, "backend: an xmpp-server-out listener"),
        ({"tls": "implicit"}, "an xmpp-server-out listener takes plaintext"),
        ({"require_tls": False}, "an xmpp-server-out listener takes plaintext"),
        ({"peer_certificates": None}, "peer_certificates: an outgoing stream's peer"),
        ({"routes": {"static": {"a.example": []}}}, "a.example: no address"),
        ({"routes": {"nameservers": ["ns.example"]}}, "listeners[0].routes.nameservers"),
    ],
)
def test_outgoing_listener_problems(
    cert_dir: Path, tmp_path: Path, listener: dict[str, object], problem: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        load_config(_write(tmp_path, yaml.safe_dump(_outgoing(cert_dir, **listener))))
    assert any(problem in line for line in refused.value.problems), refused.value.problems


def test_routes_only_on_outgoing_listeners(cert_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as refused:
        load_config(_write(tmp_path, yaml.safe_dump(_minimal(cert_dir, routes={}))))
    assert any("routes is for xmpp-server-out" in line for line in refused.value.problems)
    raw = _minimal(cert_dir)
    del raw["listeners"][0]["backend"]  # type: ignore[index]
    with pytest.raises(ConfigError) as refused:
        load_config(_write(tmp_path, yaml.safe_dump(raw)))
    assert any("backend: required" in line for line in refused.value.problems)
