"""The helper loads each certificate chain whole or refuses it.

The keeper checks every chain with ``cryptography`` before it describes it
(``tls.description``), so a garbled chain never reaches the helper through
the proxy; the helper must not rely on that and serve what it could read
of one. These tests hand it a description the keeper would not write.
"""

from __future__ import annotations

from pathlib import Path

from starttls_proxy.privileged import helper_start
from starttls_proxy.wire import Problems, Ready
from tests.tlshelper.harness import settings_for

BEGIN = b"-----BEGIN CERTIFICATE-----\n"


def _reply_to(description: bytes) -> object:
    process, control, reply = helper_start.launch_helper(description)
    control.close()
    process.wait(10)
    return reply


def test_a_chain_garbled_after_the_leaf_is_refused_by_the_helper_itself(
    tmp_path: Path, cert_dir: Path
) -> None:
    chain = tmp_path / "chain.pem"
    chain.write_bytes((cert_dir / "cert.pem").read_bytes() + (cert_dir / "ca.pem").read_bytes())
    description = helper_start.describe_helper(
        settings_for(tmp_path, [(chain, cert_dir / "key.pem")]), None
    )
    assert isinstance(_reply_to(description), Ready)
    # The second certificate's first octets of base64 become characters
    # base64 has not: the description keeps its length and its layout.
    second = description.index(BEGIN, description.index(BEGIN) + 1) + len(BEGIN)
    garbled = description[:second] + b"!!!!" + description[second + 4 :]
    reply = _reply_to(garbled)
    assert isinstance(reply, Problems)
    assert any("not a PEM certificate chain" in problem for problem in reply.problems), reply
