"""The TLS helper's description: its records, the certificate problems it
names, and its agreement with ``tls/helper/wire.h``."""

from __future__ import annotations

import dataclasses
import datetime
import struct
from pathlib import Path
from typing import Literal

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from starttls_proxy.settings import (
    CertificateConfig,
    ConfigError,
    IsolationConfig,
    IsolationLayers,
    IsolationMode,
    TLSConfig,
)
from starttls_proxy.tls import description as tls_description
from starttls_proxy.tls.description import (
    KEY_SHARE_GROUPS,
    TLS12_CIPHERS,
    TLS13_SUITES,
    Layer,
    Tag,
    describe,
    dns_names,
    read_trust_store,
    records,
)
from tests import wire_h

SECCOMP_PROGRAM = b"\x06\x00\x00\x00\x00\x00\xff\x7f"


def _describe(
    tls: TLSConfig,
    isolation: IsolationConfig | None = None,
    *,
    key_references: list[bytes] | None = None,
    provider: Path | None = None,
    seccomp_program: bytes | None = SECCOMP_PROGRAM,
    seccomp_missing: str | None = None,
    chroot_missing: str | None = None,
    uid_range: tuple[int, int] = (200_000, 65_535),
    probe_only: bool = False,
) -> bytes:
    return describe(
        tls,
        isolation or IsolationConfig(),
        key_references=key_references,
        provider=provider,
        seccomp_program=seccomp_program,
        seccomp_missing=seccomp_missing,
        chroot_missing=chroot_missing,
        uid_range=uid_range,
        probe_only=probe_only,
    )


def _tls(cert_dir: Path, min_version: Literal["1.2", "1.3"] = "1.2") -> TLSConfig:
    return TLSConfig(
        certificates=[
            CertificateConfig(cert_dir / "cert.pem", cert_dir / "key.pem"),
            CertificateConfig(cert_dir / "other.pem", cert_dir / "other-key.pem"),
        ],
        min_version=min_version,
    )


def test_the_description_record_by_record(cert_dir: Path) -> None:
    isolation = IsolationConfig(
        memory_limit=32 * 1024 * 1024, spare_workers=3, mode=IsolationMode.BEST_EFFORT
    )
    found = records(_describe(_tls(cert_dir), isolation, uid_range=(300_000, 99)))
    assert found == [
        (Tag.VERSION, b"\x00\x00\x00\x01"),
        (Tag.MIN_VERSION, b"\x03\x03"),
        (Tag.TLS12_CIPHERS, TLS12_CIPHERS.encode()),
        (Tag.TLS13_SUITES, TLS13_SUITES.encode()),
        (Tag.GROUPS, KEY_SHARE_GROUPS.encode()),
        (Tag.CERTIFICATE, b"tls.certificates[0]"),
        (Tag.CHAIN, (cert_dir / "cert.pem").read_bytes()),
        (Tag.CHAIN_PATH, str(cert_dir / "cert.pem").encode()),
        (Tag.KEY_PATH, str(cert_dir / "key.pem").encode()),
        (Tag.NAME, b"localhost"),
        (Tag.NAME, b"mail.example.test"),
        (Tag.CERTIFICATE, b"tls.certificates[1]"),
        (Tag.CHAIN, (cert_dir / "other.pem").read_bytes()),
        (Tag.CHAIN_PATH, str(cert_dir / "other.pem").encode()),
        (Tag.KEY_PATH, str(cert_dir / "other-key.pem").encode()),
        (Tag.NAME, b"other.example.test"),
        (Tag.NAME, b"*.wild.example.test"),
        (Tag.UID_RANGE, struct.pack("!II", 300_000, 99)),
        (Tag.CHROOT, b"/run/starttls-proxy/empty"),
        (Tag.MEMORY_LIMIT, struct.pack("!Q", 32 * 1024 * 1024)),
        (Tag.SPARE_WORKERS, b"\x00\x00\x00\x03"),
        (Tag.LAYERS, b"\x00\x00\x00\x7f"),
        (Tag.STRICT, b"\x00"),
        (Tag.SELF_TEST, b"\x00"),
        (Tag.SECCOMP, SECCOMP_PROGRAM),
    ]


def test_with_the_key_server_the_helper_gets_key_references(cert_dir: Path, tmp_path: Path) -> None:
    tls = TLSConfig(certificates=[CertificateConfig(cert_dir / "cert.pem", tmp_path / "gone")])
    reference = b"-----BEGIN STARTTLS PROXY KEY REFERENCE-----\n..."
    provider = Path("/usr/lib/keyref.so")
    found = records(_describe(tls, key_references=[reference], provider=provider))
    tags = [tag for tag, _ in found]
    assert Tag.KEY_PATH not in tags
    assert (Tag.KEY, reference) in found
    assert tags.index(Tag.KEY) == tags.index(Tag.CHAIN_PATH) + 1
    assert found[-1] == (Tag.PROVIDER, b"/usr/lib/keyref.so")


def test_what_the_keeper_could_not_prepare_is_said(cert_dir: Path) -> None:
    isolation = IsolationConfig(mode=IsolationMode.STRICT, self_test=True)
    found = dict(
        records(
            _describe(
                _tls(cert_dir, "1.3"),
                isolation,
                seccomp_program=None,
                seccomp_missing="libseccomp not usable: no libseccomp.so.2",
                chroot_missing="isolation.chroot: Not a directory",
            )
        )
    )
    assert found[Tag.MIN_VERSION] == b"\x03\x04"
    assert found[Tag.SECCOMP_MISSING] == b"libseccomp not usable: no libseccomp.so.2"
    assert Tag.SECCOMP not in found
    assert found[Tag.CHROOT_MISSING] == b"isolation.chroot: Not a directory"
    assert found[Tag.STRICT] == found[Tag.SELF_TEST] == b"\x01"


def test_the_seccomp_layer_off_leaves_out_both_records(cert_dir: Path) -> None:
    found = dict(records(_describe(_tls(cert_dir), seccomp_program=None)))
    assert Tag.SECCOMP not in found and Tag.SECCOMP_MISSING not in found


@pytest.mark.parametrize("layer", list(Layer))
def test_a_layer_turned_off_clears_its_bit(layer: Layer) -> None:
    layers = IsolationLayers(**{layer.name.lower(): False})
    mask = tls_description.layer_mask(IsolationConfig(layers=layers))
    assert mask == 0x7F & ~(1 << layer)


def test_the_layer_bits_follow_the_order_of_the_layers() -> None:
    only = IsolationLayers(**{field.name: False for field in dataclasses.fields(IsolationLayers)})
    for layer, bit in ((Layer.PID_NAMESPACE, 0x01), (Layer.SECCOMP, 0x40)):
        isolation = IsolationConfig(layers=dataclasses.replace(only, **{layer.name.lower(): True}))
        assert tls_description.layer_mask(isolation) == bit
    assert tls_description.layer_mask(IsolationConfig(layers=only)) == 0


def test_every_certificate_problem_is_named_at_once(cert_dir: Path, tmp_path: Path) -> None:
    garbled = tmp_path / "garbled.pem"
    garbled.write_text("not a certificate\n")
    key_only = tmp_path / "key-only.pem"
    key_only.write_bytes((cert_dir / "key.pem").read_bytes())
    tls = TLSConfig(
        certificates=[
            CertificateConfig(tmp_path / "missing.pem", tmp_path / "missing-key.pem"),
            CertificateConfig(cert_dir / "cert.pem", tmp_path / "missing-key.pem"),
            CertificateConfig(garbled, cert_dir / "key.pem"),
            CertificateConfig(key_only, cert_dir / "key.pem"),
            CertificateConfig(cert_dir / "other.pem", cert_dir / "other-key.pem"),
        ]
    )
    with pytest.raises(ConfigError) as refused:
        _describe(tls)
    problems = refused.value.problems
    assert problems[:3] == [
        f"tls.certificates[0].cert: file not found: {tmp_path / 'missing.pem'}",
        f"tls.certificates[0].key: file not found: {tmp_path / 'missing-key.pem'}",
        f"tls.certificates[1].key: file not found: {tmp_path / 'missing-key.pem'}",
    ]
    assert len(problems) == 5
    assert problems[3].startswith("tls.certificates[2].cert: not a PEM certificate chain: ")
    assert problems[4].startswith("tls.certificates[3].cert: not a PEM certificate chain: ")
    assert "CERTIFICATE" in problems[4]


def test_a_key_reference_stands_in_for_a_missing_key_file(cert_dir: Path, tmp_path: Path) -> None:
    tls = TLSConfig(
        certificates=[
            CertificateConfig(tmp_path / "missing.pem", tmp_path / "missing-key.pem"),
        ]
    )
    with pytest.raises(ConfigError) as refused:
        _describe(tls, key_references=[b"reference"])
    assert refused.value.problems == [
        f"tls.certificates[0].cert: file not found: {tmp_path / 'missing.pem'}"
    ]


def test_a_garbled_certificate_after_the_leaf_is_refused(cert_dir: Path, tmp_path: Path) -> None:
    chain = tmp_path / "chain.pem"
    chain.write_bytes(
        (cert_dir / "cert.pem").read_bytes()
        + b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
    )
    tls = TLSConfig(certificates=[CertificateConfig(chain, cert_dir / "key.pem")])
    with pytest.raises(ConfigError, match=r"tls.certificates\[0\].cert: not a PEM certificate"):
        _describe(tls)


def test_more_certificates_than_the_helper_takes_are_refused(cert_dir: Path) -> None:
    entry = CertificateConfig(cert_dir / "cert.pem", cert_dir / "key.pem")
    tls = TLSConfig(certificates=[entry] * (tls_description.MAX_CERTIFICATES + 1))
    with pytest.raises(ConfigError) as raised:
        _describe(tls)
    assert raised.value.problems == [
        f"tls.certificates: {tls_description.MAX_CERTIFICATES + 1} certificates; the TLS"
        f" helper takes at most {tls_description.MAX_CERTIFICATES}"
    ]


def test_a_leaf_with_more_names_than_the_helper_takes_is_refused(
    ca: trustme.CA, tmp_path: Path
) -> None:
    hosts = [f"host{i}.example.test" for i in range(tls_description.MAX_NAMES + 1)]
    leaf = ca.issue_cert(*hosts)
    cert, key = tmp_path / "many.pem", tmp_path / "many-key.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    with pytest.raises(ConfigError) as raised:
        _describe(TLSConfig(certificates=[CertificateConfig(cert, key)]))
    assert raised.value.problems == [
        f"tls.certificates[0].cert: the certificate names {len(hosts)} hosts; the TLS helper"
        f" takes at most {tls_description.MAX_NAMES} per certificate"
    ]


def test_a_leaf_without_san_is_named_by_its_cn() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "Mail.Example.TEST")])
    now = datetime.datetime.now(datetime.UTC)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    assert dns_names(leaf) == ("mail.example.test",)


@pytest.mark.parametrize(
    "description",
    [
        b"\x00\x01\x00\x00\x00",
        b"\x00\x01\x00\x00\x00\x04\x00\x00\x00",
        b"\x00\x63\x00\x00\x00\x00",
    ],
    ids=["header cut", "value cut", "unknown tag"],
)
def test_records_refuses_what_is_no_description(description: bytes) -> None:
    with pytest.raises(ValueError):
        records(description)


def test_tags_and_layers_agree_with_wire_h() -> None:
    assert {f"D_{tag.name}": int(tag) for tag in Tag} == wire_h.enum("description_tag")
    layers = wire_h.enum("layer")
    assert layers.pop("LAYER_COUNT") == len(Layer)
    assert {f"LAYER_{layer.name}": int(layer) for layer in Layer} == layers
    defines = wire_h.defines()
    assert defines["DESCRIPTION_VERSION"] == tls_description.DESCRIPTION_VERSION
    assert defines["MAX_DESCRIPTION"] == tls_description.MAX_DESCRIPTION
    assert defines["MAX_CERTIFICATES"] == tls_description.MAX_CERTIFICATES
    assert defines["MAX_NAMES"] == tls_description.MAX_NAMES


def test_every_layer_has_its_switch() -> None:
    switches = {field.name for field in dataclasses.fields(IsolationLayers)}
    assert {layer.name.lower() for layer in Layer} == switches


def test_peer_trust_stores_go_to_the_helper_as_bare_pem(cert_dir: Path, tmp_path: Path) -> None:
    """A listener's CA file, comments and all, becomes its certificates in
    PEM, one TRUST record per store, in the order of ``peer_trust``."""
    ca = (cert_dir / "ca.pem").read_bytes()
    commented = tmp_path / "commented.pem"
    commented.write_bytes(b"# the test CA\n" + ca + b"\n# end\n")
    tls = dataclasses.replace(_tls(cert_dir), peer_trust=(commented, cert_dir / "ca.pem"))
    trust = [value for tag, value in records(_describe(tls)) if tag is Tag.TRUST]
    canonical = x509.load_pem_x509_certificate(ca).public_bytes(serialization.Encoding.PEM)
    assert trust == [canonical, canonical]
    # --isolation-report's helper loads no certificate, and no trust store.
    probe = _describe(tls, probe_only=True)
    assert Tag.TRUST not in [tag for tag, _ in records(probe)]


def test_every_trust_store_problem_is_named_at_once(cert_dir: Path, tmp_path: Path) -> None:
    garbled = tmp_path / "garbled.pem"
    garbled.write_text("no certificate here\n")
    tls = dataclasses.replace(
        _tls(cert_dir), peer_trust=(tmp_path / "missing.pem", garbled, cert_dir / "ca.pem")
    )
    with pytest.raises(ConfigError) as refused:
        _describe(tls)
    problems = refused.value.problems
    assert problems[0] == f"peer_certificates.trust: {tmp_path / 'missing.pem'}: file not found"
    assert problems[1] == (
        f"peer_certificates.trust: {garbled}: not a PEM list of CA certificates (none found)"
    )
    assert len(problems) == 2


def test_a_certificate_cryptography_cannot_read_leaves_the_rest_of_the_store(
    cert_dir: Path, tmp_path: Path
) -> None:
    broken = b"-----BEGIN CERTIFICATE-----\nbm90IERFUg==\n-----END CERTIFICATE-----\n"
    mixed = tmp_path / "mixed.pem"
    mixed.write_bytes(broken + (cert_dir / "ca.pem").read_bytes())
    assert read_trust_store(mixed) == read_trust_store(cert_dir / "ca.pem")
