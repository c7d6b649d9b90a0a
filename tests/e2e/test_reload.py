"""Certificate renewal for real: SIGHUP with 100 sessions open.

The renewal story of the SSLMate post: new files are put in place, the
proxy is told to reload; sessions in progress finish on the old
certificate, new connections get the new one, and a broken pair (key of
another certificate) is refused while the good one stays in service.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trustme
import yaml
from cryptography import x509

from tests.realservers import processes
from tests.realservers.certs import CertFiles, write_test_certs
from tests.realservers.dialogue import read_smtp_reply, smtp_upgraded
from tests.realservers.fs import ensure_traversable
from tests.realservers.metrics import scrape, total
from tests.realservers.net import free_port
from tests.realservers.postfix import PostfixInstance
from tests.realservers.proxy import ProxyProcess, StartProxy, listener

SESSIONS = 100


@pytest.fixture(scope="module")
def renewal(tmp_path_factory: pytest.TempPathFactory, test_ca: trustme.CA) -> dict[str, CertFiles]:
    base = tmp_path_factory.mktemp("renewal")
    return {name: write_test_certs(base / name, test_ca) for name in ("old", "new", "other")}


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, renewal: dict[str, CertFiles]) -> Path:
    """Where the proxy's configuration points: the certificate in service."""
    directory = tmp_path_factory.mktemp("live")
    shutil.copy(renewal["old"].cert, directory / "cert.pem")
    shutil.copy(renewal["old"].key, directory / "key.pem")
    directory.chmod(0o755)
    return directory


@pytest.fixture(scope="module")
def proxy(module_proxy: StartProxy, postfix: PostfixInstance, live: Path) -> ProxyProcess:
    return module_proxy(
        [listener("smtp", postfix.proxy_port, backend={"identity": "proxy-v2"})],
        certificates=[(live / "cert.pem", live / "key.pem")],
    )


def _serial(pem_or_der: bytes) -> int:
    return x509.load_der_x509_certificate(pem_or_der).serial_number


def _serial_of_file(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


def _served_serial(proxy: ProxyProcess, name: str, certs: CertFiles) -> int:
    tls = smtp_upgraded(proxy.connect(name, "127.0.0.60"), certs, ehlo=False)
    der = tls.getpeercert(binary_form=True)
    assert der is not None
    tls.sendall(b"QUIT\r\n")
    read_smtp_reply(tls)
    tls.close()
    return _serial(der)


def _reload(proxy: ProxyProcess, expect: str) -> None:
    """SIGHUP, then the outcome's log line: ``reloaded`` or ``reload refused``."""
    mark = len(proxy.log())
    proxy.process.send_signal(signal.SIGHUP)
    outcome = _reload_outcome(proxy, mark)
    assert expect in outcome, outcome


def _reload_outcome(proxy: ProxyProcess, mark: int) -> str:
    """The proxy's log from ``mark`` on, once it holds a reload's outcome."""
    deadline = time.monotonic() + 60
    while not re.search(r"reloaded|reload refused", proxy.log()[mark:]):
        assert time.monotonic() < deadline, proxy.log()[mark:]
        time.sleep(0.05)
    return proxy.log()[mark:]


def _install(live: Path, cert: Path, key: Path) -> None:
    shutil.copy(cert, live / "cert.pem.new")
    shutil.copy(key, live / "key.pem.new")
    (live / "cert.pem.new").replace(live / "cert.pem")
    (live / "key.pem.new").replace(live / "key.pem")


def test_renewal_with_sessions_open(
    proxy: ProxyProcess, renewal: dict[str, CertFiles], live: Path
) -> None:
    old, new, other = renewal["old"], renewal["new"], renewal["other"]
    assert _served_serial(proxy, "smtp", old) == _serial_of_file(old.cert)
    sessions = [
        smtp_upgraded(proxy.connect("smtp", "127.0.0.60"), old, ehlo=False) for _ in range(SESSIONS)
    ]

    _install(live, new.cert, new.key)
    _reload(proxy, "reloaded")
    assert _served_serial(proxy, "smtp", new) == _serial_of_file(new.cert)

    # A broken pair: the new certificate with another one's key.
    _install(live, new.cert, other.key)
    _reload(proxy, "reload refused")
    assert "does not match the certificate" in proxy.log()
    assert _served_serial(proxy, "smtp", new) == _serial_of_file(new.cert)

    # The old helper's workers and the new one's: never one UID for two.
    sessions += [
        smtp_upgraded(proxy.connect("smtp", "127.0.0.60"), new, ehlo=False) for _ in range(SESSIONS)
    ]
    uids = processes.worker_uids(proxy)
    assert len(uids) >= 2 * SESSIONS and len(set(uids)) == len(uids)

    # Every session opened before and after the reloads completes normally.
    for tls in sessions:
        tls.sendall(b"NOOP\r\n")
        assert read_smtp_reply(tls).startswith(b"250")
        tls.sendall(b"QUIT\r\n")
        assert read_smtp_reply(tls).startswith(b"221")
        tls.close()


def test_reload_opens_and_closes_listeners(
    proxy: ProxyProcess, renewal: dict[str, CertFiles], live: Path, postfix: PostfixInstance
) -> None:
    _install(live, renewal["new"].cert, renewal["new"].key)
    config = yaml.safe_load(proxy.config_path.read_text())
    added_port = free_port()
    added = listener("added", postfix.proxy_port, backend={"identity": "proxy-v2"})
    added["listen"] = f"127.0.0.1:{added_port}"
    config["listeners"].append(added)
    proxy.config_path.write_text(yaml.safe_dump(config))
    _reload(proxy, "reloaded")
    proxy.ports["added"] = added_port
    assert _served_serial(proxy, "added", renewal["new"]) == _serial_of_file(renewal["new"].cert)

    config["listeners"] = [entry for entry in config["listeners"] if entry["name"] != "added"]
    proxy.config_path.write_text(yaml.safe_dump(config))
    _reload(proxy, "reloaded")
    with pytest.raises(ConnectionRefusedError):
        proxy.connect("added")


def test_a_reload_that_turns_reuse_port_on_is_refused_and_the_listener_serves_on(
    proxy: ProxyProcess, renewal: dict[str, CertFiles], live: Path
) -> None:
    """The socket would have to be bound again on its own address: the
    reload says why it cannot, instead of "address already in use"."""
    serving = _served_serial(proxy, "smtp", renewal["new"])
    original = proxy.config_path.read_text()
    config = yaml.safe_load(original)
    config["listeners"][0]["reuse_port"] = True
    proxy.config_path.write_text(yaml.safe_dump(config))
    try:
        mark = len(proxy.log())
        proxy.process.send_signal(signal.SIGHUP)
        outcome = _reload_outcome(proxy, mark)
    finally:
        proxy.config_path.write_text(original)
    assert "reload refused" in outcome
    assert "smtp: reuse_port changes only at a restart" in outcome
    assert _served_serial(proxy, "smtp", renewal["new"]) == serving


def test_a_reload_drops_the_expiry_of_a_certificate_it_removed(
    module_proxy: StartProxy,
    postfix: PostfixInstance,
    renewal: dict[str, CertFiles],
    tmp_path: Path,
    metrics_port: int,
) -> None:
    """Regression: the expiry gauge kept the series of a certificate the
    reload took out of the configuration, so its renewal alert fired on."""
    before, after = tmp_path / "before", tmp_path / "after"
    for directory, certs in ((before, renewal["old"]), (after, renewal["new"])):
        directory.mkdir()
        shutil.copy(certs.cert, directory / "cert.pem")
        shutil.copy(certs.key, directory / "key.pem")
    ensure_traversable(tmp_path)
    proxy = module_proxy(
        [listener("smtp", postfix.proxy_port, backend={"identity": "proxy-v2"})],
        certificates=[(before / "cert.pem", before / "key.pem")],
        metrics={"listen": f"127.0.0.1:{metrics_port}"},
    )

    def expiring() -> set[str]:
        return {
            sample.labels["certificate"]
            for sample in scrape(metrics_port)
            if sample.name == "starttls_proxy_certificate_not_after_seconds"
        }

    assert expiring() == {str(before / "cert.pem")}
    config = yaml.safe_load(proxy.config_path.read_text())
    config["tls"]["certificates"] = [
        {"cert": str(after / "cert.pem"), "key": str(after / "key.pem")}
    ]
    proxy.config_path.write_text(yaml.safe_dump(config))
    _reload(proxy, "reloaded")
    assert expiring() == {str(after / "cert.pem")}


HOOK = Path(__file__).resolve().parents[2] / "deploy" / "renewal" / "starttls-proxy-renewed"


def _certbot_renews(lineage: Path, archive: Path, number: int, certs: CertFiles) -> None:
    """What certbot does: the new files into archive/, then the live/
    symlinks moved to them."""
    shutil.copy(certs.cert, archive / f"fullchain{number}.pem")
    shutil.copy(certs.key, archive / f"privkey{number}.pem")
    for name in ("fullchain", "privkey"):
        link = lineage / f"{name}.pem.new"
        link.symlink_to(Path("..", "..", "archive", "mail", f"{name}{number}.pem"))
        link.replace(lineage / f"{name}.pem")


def _run_hook(proxy: ProxyProcess, lineage: Path) -> subprocess.CompletedProcess[str]:
    """The deploy hook as certbot runs it; the reload is a SIGHUP here (no systemd)."""
    mark = len(proxy.log())
    hook = subprocess.run(
        [str(HOOK)],
        capture_output=True,
        text=True,
        check=False,
        env={
            **os.environ,
            "RENEWED_LINEAGE": str(lineage),
            "STARTTLS_PROXY_CONFIG": str(proxy.config_path),
            "STARTTLS_PROXY": str(Path(sys.executable).with_name("starttls-proxy")),
            "STARTTLS_PROXY_RELOAD": f"kill -HUP {proxy.process.pid}",
        },
    )
    _reload_outcome(proxy, mark)
    return hook


def test_certbot_renewal_through_the_deploy_hook(
    module_proxy: StartProxy,
    postfix: PostfixInstance,
    renewal: dict[str, CertFiles],
    tmp_path: Path,
) -> None:
    """deploy/renewal/starttls-proxy-renewed on certbot's layout: a good
    renewal goes into service; a bad one (the SSLMate post's failure: a
    certificate with the wrong key) is kept out, the old certificate stays,
    the hook fails and the reload failure is counted for the alert."""
    lineage, archive = tmp_path / "live" / "mail", tmp_path / "archive" / "mail"
    lineage.mkdir(parents=True)
    archive.mkdir(parents=True)
    _certbot_renews(lineage, archive, 1, renewal["old"])
    ensure_traversable(tmp_path)
    metrics_port = free_port()  # the module's is another proxy's
    proxy = module_proxy(
        [listener("smtp", postfix.proxy_port, backend={"identity": "proxy-v2"})],
        certificates=[(lineage / "fullchain.pem", lineage / "privkey.pem")],
        metrics={"listen": f"127.0.0.1:{metrics_port}"},
    )
    old, new, other = renewal["old"], renewal["new"], renewal["other"]
    assert _served_serial(proxy, "smtp", old) == _serial_of_file(old.cert)

    _certbot_renews(lineage, archive, 2, new)
    assert _run_hook(proxy, lineage).returncode == 0
    assert _served_serial(proxy, "smtp", new) == _serial_of_file(new.cert)

    bad = CertFiles(cert=other.cert, key=new.key, ca=other.ca)
    _certbot_renews(lineage, archive, 3, bad)
    hook = _run_hook(proxy, lineage)
    assert hook.returncode != 0
    assert "does not match the certificate" in hook.stderr
    assert "the proxy keeps the ones it serves" in hook.stderr
    assert _served_serial(proxy, "smtp", new) == _serial_of_file(new.cert)
    failed = total(scrape(metrics_port), "starttls_proxy_config_reloads_total", result="failed")
    assert failed == 1
