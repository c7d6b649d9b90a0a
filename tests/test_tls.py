"""Loading certificates with ``tls.contexts`` (what ``--check`` runs): a
pair that does not belong together, and missing or garbled files, are
refused with one problem each, naming the YAML path.

Handshakes are tested against the real TLS helper, and against the
pyOpenSSL contexts this module builds, in ``tests/tlshelper/test_handshakes.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from starttls_proxy.settings import CertificateConfig, ConfigError, TLSConfig
from starttls_proxy.tls.contexts import load_certificates


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
