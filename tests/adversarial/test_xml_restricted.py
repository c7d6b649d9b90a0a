"""RFC 6120 section 11.1 restricted XML, through the live proxy in front of
the real Prosody.

An XMPP stream may not carry comments, processing instructions, internal or
external DTD subsets, or entity references other than the predefined ones
(RFC 6120 section 11.1; the billion-laughs and XXE attacks are why), must be
UTF-8 (section 11.6) and namespace-well-formed (section 11.2). Each case
puts one such feature at one point of the stream and reads the stream error
the proxy answers with (section 4.9.3): ``restricted-xml``,
``not-well-formed``, ``unsupported-encoding``. The last cases check that no
``<proceed/>`` comes from an element that is not the real ``<starttls/>``.
"""

from __future__ import annotations

import itertools
import re

import pytest

from tests.realservers.certs import CertFiles
from tests.realservers.net import read_to_end
from tests.realservers.prosody import ProsodyInstance
from tests.realservers.proxy import ProxyProcess, StartProxy, listener
from tests.realservers.xmpp import PROCEED, XMPPStream, stream_header

READ_TIMEOUT = 5.0

_sources = (f"127.0.10.{n}" for n in itertools.count(1))

HEADER_OPEN = b"<stream:stream to='localhost' xmlns='jabber:client' "
HEADER_REST = b"xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>"
MESSAGE = b"<message to='bob@localhost' type='chat'><body>%s</body></message>"

#: Each feature as it appears inside a stanza's content, with its condition.
FEATURES = {
    "comment": (b"<!-- hidden -->", "restricted-xml"),
    "processing_instruction": (b"<?evil do-it?>", "restricted-xml"),
    "doctype": (b"<!DOCTYPE x [<!ENTITY a 'b'>]>", "restricted-xml"),
    "entity_declaration": (b"<!ENTITY lol 'lol'>", "restricted-xml"),
    "entity_reference": (b"&lol;", "restricted-xml"),
    "external_entity_reference": (b"&xxe;", "restricted-xml"),
    "unbound_prefix": (b"<evil:x/>", "not-well-formed"),
}

#: (what the client sends, the condition), per point of the stream.
CASES: dict[str, tuple[bytes, str]] = {
    # Before the stream header.
    **{
        f"before_header_{name}": (feature + stream_header(), condition)
        for name, (feature, condition) in FEATURES.items()
        if name not in ("entity_reference", "external_entity_reference", "unbound_prefix")
    },
    "before_header_utf16_declaration": (
        b"<?xml version='1.0' encoding='UTF-16'?>" + stream_header(),
        "unsupported-encoding",
    ),
    "before_header_latin1_declaration": (
        b"<?xml version='1.0' encoding='ISO-8859-1'?>" + stream_header(),
        "unsupported-encoding",
    ),
    # Inside the header: an attribute value with an entity, a prefix unbound.
    "in_header_entity_reference": (
        HEADER_OPEN + b"from='&xxe;' " + HEADER_REST,
        "restricted-xml",
    ),
    "in_header_unbound_prefix": (
        HEADER_OPEN + b"evil:attr='1' " + HEADER_REST,
        "not-well-formed",
    ),
    # Between stanzas, before TLS.
    **{
        f"between_stanzas_{name}": (stream_header() + feature, condition)
        for name, (feature, condition) in FEATURES.items()
        if name not in ("entity_reference", "external_entity_reference")
    },
    # Inside a stanza, before TLS.
    **{
        f"in_stanza_{name}": (stream_header() + MESSAGE % feature, condition)
        for name, (feature, condition) in FEATURES.items()
    },
}


@pytest.fixture(scope="module")
def proxy(module_proxy: StartProxy, prosody: ProsodyInstance) -> ProxyProcess:
    return module_proxy(
        [listener("xmpp", prosody.port, "xmpp-client", hostname="localhost", domains=["localhost"])]
    )


def _stream_error(said: bytes) -> str:
    found = re.search(
        rb"<stream:error[^>]*><([a-z-]+) xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>", said
    )
    assert found is not None, said
    assert said.rstrip().endswith(b"</stream:stream>"), said
    return found[1].decode()


@pytest.mark.parametrize("case", CASES)
def test_restricted_xml_before_tls_gets_its_stream_error(proxy: ProxyProcess, case: str) -> None:
    """RFC 6120 section 11.1 (restricted XML), 11.2 (namespaces), 11.6
    (UTF-8 only), with the conditions of section 4.9.3: each feature, at
    each point before TLS, ends the stream with its defined error."""
    sent, condition = CASES[case]
    sock = proxy.connect("xmpp", next(_sources))
    sock.settimeout(READ_TIMEOUT)
    sock.sendall(sent)
    said = read_to_end(sock, ends=(OSError,))
    sock.close()
    assert _stream_error(said) == condition
    assert PROCEED not in said


@pytest.mark.parametrize("feature", FEATURES)
def test_restricted_xml_after_tls_gets_its_stream_error(
    proxy: ProxyProcess, test_certs: CertFiles, feature: str
) -> None:
    """RFC 6120 section 11.1 inside TLS: the proxy still reads every stanza
    it relays to Prosody, and a restricted feature ends the stream with its
    defined error instead of reaching the backend."""
    sock = proxy.connect("xmpp", next(_sources))
    sock.settimeout(READ_TIMEOUT)
    stream = XMPPStream(sock)
    stream.starttls(test_certs.client_context())
    stream.send(stream_header())
    stream.read_until(b"</stream:features>")
    text, condition = FEATURES[feature]
    stream.send(MESSAGE % text)
    said = stream.read_all()
    stream.close()
    assert _stream_error(said) == condition


#: Elements that look like STARTTLS and are not.
NOT_STARTTLS = {
    "wrong_namespace": b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>",
    "no_namespace_declared_default": b"<tls:starttls xmlns:tls='urn:example:not-tls'/>",
    "nested": (b"<iq type='set' id='x'><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/></iq>"),
}


@pytest.mark.parametrize("element", NOT_STARTTLS)
def test_no_proceed_for_an_element_that_is_not_starttls(proxy: ProxyProcess, element: str) -> None:
    """RFC 6120 section 5.4.2.1: only ``<starttls/>`` qualified by
    urn:ietf:params:xml:ns:xmpp-tls, as a first-level element, is the
    upgrade. Anything else before TLS is refused and gets no ``<proceed/>``."""
    sock = proxy.connect("xmpp", next(_sources))
    sock.settimeout(READ_TIMEOUT)
    stream = XMPPStream(sock)
    stream.send(stream_header())
    stream.read_until(b"</stream:features>")
    stream.send(NOT_STARTTLS[element])
    said = stream.read_all()
    stream.close()
    assert PROCEED not in said
    assert b"<stream:error" in said, said


def test_starttls_with_children_is_refused_or_is_the_upgrade(
    proxy: ProxyProcess, test_certs: CertFiles
) -> None:
    """RFC 6120 section 5.4.2.1: ``<starttls/>`` has no defined children. One
    with a child either gets a stream error or, at most, is the upgrade
    itself: the child must never reach the backend (it is discarded)."""
    sock = proxy.connect("xmpp", next(_sources))
    sock.settimeout(READ_TIMEOUT)
    stream = XMPPStream(sock)
    stream.send(stream_header())
    stream.read_until(b"</stream:features>")
    stream.send(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'><evil/></starttls>")
    first = stream.sock.recv(4096)
    if first.startswith(PROCEED):
        stream.wrap(test_certs.client_context(), "localhost")
        stream.send(stream_header())
        assert b"<starttls" not in stream.read_until(b"</stream:features>")
        stream.send(b"</stream:stream>")
        stream.read_all()
    else:
        assert b"<stream:error" in first + stream.read_all()
    stream.close()
