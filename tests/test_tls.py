"""The worker's TLS core and the certificate store, without sockets.

The server side is the real ``TLSPump``; the client is the standard library's
``ssl`` over memory BIOs (as mitmproxy's TLS layer tests do).
"""

from __future__ import annotations

import contextlib
import ssl
from pathlib import Path

import pytest
import trustme
from OpenSSL import SSL

from starttls_proxy.settings import CertificateConfig, ConfigError, TLSConfig
from starttls_proxy.tls_contexts import CertificateStore, load_certificates
from starttls_proxy.worker import TLSPump


def _store(cert_dir: Path, min_version: str = "1.2") -> CertificateStore:
    return load_certificates(
        TLSConfig(
            certificates=[
                CertificateConfig(cert=cert_dir / "cert.pem", key=cert_dir / "key.pem"),
                CertificateConfig(cert=cert_dir / "other.pem", key=cert_dir / "other-key.pem"),
            ],
            min_version=min_version,  # type: ignore[arg-type]
        )
    )


class MemoryClient:
    def __init__(
        self, cert_dir: Path, server_name: str, alpn: list[str] | None = None, **options: object
    ) -> None:
        context = ssl.create_default_context(cafile=str(cert_dir / "ca.pem"))
        for name, value in options.items():
            setattr(context, name, value)
        if alpn:
            context.set_alpn_protocols(alpn)
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname=server_name)


def _handshake(client: MemoryClient, pump: TLSPump) -> None:
    for _ in range(10):
        try:
            client.tls.do_handshake()
            return
        except ssl.SSLWantReadError:
            pass
        finally:
            pump.receive_ciphertext(client.outgoing.read())
            client.incoming.write(pump.take_ciphertext())
    raise AssertionError("handshake did not finish")


def test_handshake_and_both_directions(cert_dir: Path) -> None:
    pump = TLSPump(_store(cert_dir).default)
    client = MemoryClient(cert_dir, "localhost")
    _handshake(client, pump)
    assert pump.handshake_done
    info = pump.info()
    assert info.version == "TLSv1.3"
    assert info.server_name == "localhost"
    client.tls.write(b"EHLO client.test\r\n")
    assert pump.receive_ciphertext(client.outgoing.read()) == b"EHLO client.test\r\n"
    pump.send_plaintext(b"250 ok\r\n")
    client.incoming.write(pump.take_ciphertext())
    assert client.tls.read() == b"250 ok\r\n"


def test_close_notify_from_client_is_seen(cert_dir: Path) -> None:
    pump = TLSPump(_store(cert_dir).default)
    client = MemoryClient(cert_dir, "localhost")
    _handshake(client, pump)
    with contextlib.suppress(ssl.SSLWantReadError):
        client.tls.unwrap()
    pump.receive_ciphertext(client.outgoing.read())
    assert pump.closed_by_client


@pytest.mark.parametrize(
    ("server_name", "expected_serial_of"),
    [("other.example.test", 1), ("a.wild.example.test", 1), ("localhost", 0), ("nope.test", 0)],
)
@pytest.mark.parametrize("warmed_up", [False, True])
def test_certificate_chosen_by_sni(
    cert_dir: Path, server_name: str, expected_serial_of: int, warmed_up: bool
) -> None:
    """Also after the helper's warm-up handshakes (``CertificateStore.warm_up``)."""
    store = _store(cert_dir)
    if warmed_up:
        store.warm_up()
    pump = TLSPump(store.default)
    client = MemoryClient(cert_dir, server_name, check_hostname=False)
    _handshake(client, pump)
    served = client.tls.getpeercert(binary_form=True)
    from cryptography import x509

    assert served is not None
    serial = x509.load_der_x509_certificate(served).serial_number
    assert serial == store.certificates[expected_serial_of].serial


def test_tls12_without_forward_secrecy_is_refused(cert_dir: Path) -> None:
    pump = TLSPump(_store(cert_dir).default)
    client = MemoryClient(cert_dir, "localhost", maximum_version=ssl.TLSVersion.TLSv1_2)
    client.tls.context.set_ciphers("AES128-GCM-SHA256")  # static RSA key exchange
    with pytest.raises(SSL.Error, match="no shared cipher"):
        _handshake(client, pump)


def test_tls12_ecdhe_is_accepted(cert_dir: Path) -> None:
    pump = TLSPump(_store(cert_dir).default)
    client = MemoryClient(cert_dir, "localhost", maximum_version=ssl.TLSVersion.TLSv1_2)
    _handshake(client, pump)
    assert pump.info().version == "TLSv1.2"
    assert pump.info().cipher.startswith("ECDHE-")


def test_tls12_is_refused_when_the_minimum_is_13(cert_dir: Path) -> None:
    pump = TLSPump(_store(cert_dir, min_version="1.3").default)
    client = MemoryClient(cert_dir, "localhost", maximum_version=ssl.TLSVersion.TLSv1_2)
    with pytest.raises(SSL.Error, match="unsupported protocol"):
        _handshake(client, pump)


def test_mismatched_key_is_refused(cert_dir: Path) -> None:
    config = TLSConfig(
        certificates=[CertificateConfig(cert=cert_dir / "cert.pem", key=cert_dir / "other-key.pem")]
    )
    with pytest.raises(ConfigError) as caught:
        load_certificates(config)
    assert caught.value.problems == [
        f"tls.certificates[0].key: does not match the certificate {cert_dir / 'cert.pem'} "
        "(refusing the pair)"
    ]


def test_missing_and_garbage_files_are_named(cert_dir: Path, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    config = TLSConfig(
        certificates=[
            CertificateConfig(cert=tmp_path / "absent.pem", key=cert_dir / "key.pem"),
            CertificateConfig(cert=garbage, key=cert_dir / "key.pem"),
        ]
    )
    with pytest.raises(ConfigError) as caught:
        load_certificates(config)
    problems = caught.value.problems
    assert problems[0].startswith("tls.certificates[0].cert: file not found")
    assert problems[1].startswith("tls.certificates[1].cert: not a PEM certificate chain")


@pytest.mark.parametrize(
    ("listener_alpn", "client_alpn", "selected"),
    [
        (("xmpp-client",), ["xmpp-client"], "xmpp-client"),
        (("xmpp-client",), ["h2", "xmpp-client"], "xmpp-client"),
        (("xmpp-client",), ["h2"], None),
        ((), ["xmpp-client"], None),
    ],
)
def test_alpn_offered_per_listener(
    cert_dir: Path, listener_alpn: tuple[str, ...], client_alpn: list[str], selected: str | None
) -> None:
    pump = TLSPump(_store(cert_dir).default, listener_alpn)
    client = MemoryClient(cert_dir, "localhost", client_alpn)
    _handshake(client, pump)
    assert client.tls.selected_alpn_protocol() == selected
    assert pump.info().alpn == selected


def test_rsa_certificates_work_too(tmp_path: Path, ca: trustme.CA) -> None:
    leaf = ca.issue_cert("rsa.example.test", key_type=trustme.KeyType.RSA)
    leaf.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    store = load_certificates(
        TLSConfig(
            certificates=[CertificateConfig(cert=tmp_path / "cert.pem", key=tmp_path / "key.pem")]
        )
    )
    for maximum in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        pump = TLSPump(store.default)
        client = MemoryClient(tmp_path, "rsa.example.test", maximum_version=maximum)
        _handshake(client, pump)
        assert pump.info().version == (
            "TLSv1.2" if maximum is ssl.TLSVersion.TLSv1_2 else "TLSv1.3"
        )
        assert pump.info().cipher.startswith(
            "ECDHE-RSA-" if maximum is ssl.TLSVersion.TLSv1_2 else "TLS_"
        )
