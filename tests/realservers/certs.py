"""Test certificates made with ``trustme``, written where the real daemons can read them."""

from __future__ import annotations

import datetime
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import trustme

from tests.realservers.fs import ensure_traversable, make_dirs

#: Names in the default server certificate (proxy listeners and backends on loopback).
DEFAULT_IDENTITIES: tuple[str, ...] = ("localhost", "mail.example.test", "127.0.0.1")


@dataclass(frozen=True)
class CertFiles:
    """PEM files of one server certificate.

    ``ca`` is the issuing CA certificate (what a client trusts), ``cert`` the leaf
    followed by its chain, ``key`` the leaf's unencrypted private key.
    """

    ca: Path
    cert: Path
    key: Path

    def client_context(self) -> ssl.SSLContext:
        """A client :class:`ssl.SSLContext` that trusts only ``ca`` (hostname checks on)."""
        return ssl.create_default_context(cafile=str(self.ca))


def write_test_certs(
    directory: Path,
    ca: trustme.CA,
    identities: Sequence[str] = DEFAULT_IDENTITIES,
    *,
    key_type: trustme.KeyType = trustme.KeyType.ECDSA,
    valid_for: datetime.timedelta | None = None,
) -> CertFiles:
    """Issue a leaf for ``identities`` from ``ca`` and write ``ca.pem``, ``cert.pem``, ``key.pem``.

    ``directory`` (created if needed) gets mode 755 and is made reachable by other
    users, and the files get mode 644 (the key too): Postfix, Dovecot and Prosody read
    them as different unprivileged users.  Test material only.

    ``valid_for``: the leaf expires that long from now (trustme's default is
    centuries away, which ejabberd 23.01 cannot take: its certificate manager
    crashes arming an expiry timer beyond Erlang's limit of about 49 days, and
    ejabberd then has no certificate for STARTTLS).
    """
    if not identities:
        raise ValueError("a certificate needs at least one identity")
    make_dirs(directory)
    ensure_traversable(directory)
    not_after = None
    if valid_for is not None:
        not_after = datetime.datetime.now(datetime.UTC) + valid_for
    leaf = ca.issue_cert(*identities, key_type=key_type, not_after=not_after)
    files = CertFiles(
        ca=directory / "ca.pem", cert=directory / "cert.pem", key=directory / "key.pem"
    )
    ca.cert_pem.write_to_path(files.ca)
    for index, blob in enumerate(leaf.cert_chain_pems):
        blob.write_to_path(files.cert, append=index > 0)
    leaf.private_key_pem.write_to_path(files.key)
    for path in (files.ca, files.cert, files.key):
        path.chmod(0o644)
    return files
