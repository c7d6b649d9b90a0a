"""An XMPP stream cut into tokens: the stream header, first-level elements, whitespace, the end.

Theory of operation
-------------------
An XMPP stream is one XML document whose root, ``<stream:stream>``, stays open
for the whole session (RFC 6120 section 4.1); every first-level element
below it (a stanza, ``<starttls/>``, ``<stream:features>``...) is a unit the
proxy acts on. The reader works in two layers, and no byte reaches the
second before the first has accepted it:

1. A *scanner* jumps from one markup character to the next (``<``, ``>``,
   quotes, the end of a CDATA section) to find where each token ends. It keeps
   the limits as the bytes arrive -- the nesting depth at each start tag,
   the length of an attribute value while it is still open, the size of the
   token -- and refuses what RFC 6120 section 11.1 forbids (DTDs, comments,
   processing instructions, entity references other than the predefined and
   numeric ones) at the first ``<!`` or ``<?``. So a billion-laughs document, an
   external entity or 10,000 nested elements are refused after a few bytes,
   before any parser could expand or build anything, and a 10 MB attribute
   after about ``max_attribute_size`` of them.
2. lxml's feed parser (hardened: no entity resolution, no network, no DTD,
   libxml2's own size limits on) then parses each complete token in the
   namespace context of the stream header. That checks well-formedness,
   namespace well-formedness and UTF-8 (section 11.6), and gives the caller a
   tree. The root never closes, so the parser is replaced after a while: its
   name dictionary only grows.

Tokens keep their raw bytes: the proxy relays what it received, byte for
byte, and re-serializes only what it must change. The stream-level markup the
proxy writes of its own (headers, stream errors) is at the end.
"""

from __future__ import annotations

import enum
import html
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from lxml import etree

from protocols._base import RemoteProtocolError

NS_STREAMS: Final = "http://etherx.jabber.org/streams"
NS_STREAM_ERRORS: Final = "urn:ietf:params:xml:ns:xmpp-streams"
NS_DIALBACK: Final = "jabber:server:dialback"
#: The qualified name of the stream root.
STREAM: Final = f"{{{NS_STREAMS}}}stream"


class StreamErrorCondition(enum.Enum):
    """The defined stream error conditions the proxy uses (RFC 6120 section 4.9.3)."""

    BAD_FORMAT = "bad-format"
    CONNECTION_TIMEOUT = "connection-timeout"
    HOST_UNKNOWN = "host-unknown"
    IMPROPER_ADDRESSING = "improper-addressing"
    INTERNAL_SERVER_ERROR = "internal-server-error"
    INVALID_FROM = "invalid-from"
    INVALID_NAMESPACE = "invalid-namespace"
    NOT_AUTHORIZED = "not-authorized"
    NOT_WELL_FORMED = "not-well-formed"
    POLICY_VIOLATION = "policy-violation"
    REMOTE_CONNECTION_FAILED = "remote-connection-failed"
    RESOURCE_CONSTRAINT = "resource-constraint"
    RESTRICTED_XML = "restricted-xml"
    SYSTEM_SHUTDOWN = "system-shutdown"
    UNSUPPORTED_ENCODING = "unsupported-encoding"
    UNSUPPORTED_VERSION = "unsupported-version"


class XMLStreamError(RemoteProtocolError):
    """The peer's stream cannot go on; ``condition`` is the stream error to send."""

    def __init__(self, condition: StreamErrorCondition, reason: str) -> None:
        super().__init__(reason)
        self.condition = condition
        self.reason = reason


@dataclass(frozen=True)
class Limits:
    """What one direction of a stream may send."""

    #: Largest token (the stream header, or one first-level element), in octets.
    max_stanza_size: int
    #: Deepest element, the first-level element being at depth 1.
    max_depth: int
    #: Longest attribute value, in octets.
    max_attribute_size: int

    def scaled(self, factor: int) -> Limits:
        return Limits(
            self.max_stanza_size * factor, self.max_depth * factor, self.max_attribute_size * factor
        )


@dataclass(frozen=True)
class StreamHeader:
    """The opening ``<stream:stream ...>`` tag, with the XML declaration before it if any."""

    raw: bytes
    #: The stream root: its tag, attributes and namespace map (no children).
    element: etree._Element


@dataclass(frozen=True)
class StreamElement:
    """One complete first-level element: a stanza or a negotiation element.

    ``element`` stays attached to the stream root (so that serializing it
    needs no namespace declarations of its own) until the next token is read.
    """

    raw: bytes
    element: etree._Element


@dataclass(frozen=True)
class Whitespace:
    """Whitespace between first-level elements (a keepalive, RFC 6120 section 4.6.1)."""

    raw: bytes


@dataclass(frozen=True)
class StreamEnd:
    """The closing ``</stream:stream>`` tag."""

    raw: bytes


Token = StreamHeader | StreamElement | Whitespace | StreamEnd


class _Mode(enum.Enum):
    #: In character data, or between tokens.
    CONTENT = enum.auto()
    #: Inside ``<?xml ... ?>`` before the stream header.
    DECLARATION = enum.auto()
    #: Inside a start tag, after its ``<``.
    START_TAG = enum.auto()
    #: Inside an end tag, after its ``</``.
    END_TAG = enum.auto()
    #: Inside ``<![CDATA[ ... ]]>``.
    CDATA = enum.auto()


_LT: Final = ord("<")
_SLASH: Final = ord("/")
_BANG: Final = ord("!")
_QUESTION: Final = ord("?")
_WHITESPACE: Final = re.compile(rb"[ \t\r\n]*")
#: What ends the unquoted part of a tag: a quote opens a value, ``>`` ends it.
_TAG_MARKUP: Final = re.compile(rb"[\"'<>]")
_S: Final = rb"[ \t\r\n]+"
_EQ: Final = rb"[ \t\r\n]*=[ \t\r\n]*"
#: XML 1.0 production [23] XMLDecl, restricted to what a stream may declare.
_XML_DECLARATION: Final = re.compile(
    rb"<\?xml" + _S + rb"version" + _EQ + rb"(['\"])1\.[0-9]+\1"
    rb"(?:" + _S + rb"encoding" + _EQ + rb"(['\"])([A-Za-z][A-Za-z0-9._-]*)\2)?"
    rb"(?:" + _S + rb"standalone" + _EQ + rb"(['\"])(?:yes|no)\4)?[ \t\r\n]*\?>"
)
_MAX_DECLARATION: Final = 256
_CDATA_OPEN: Final = b"<![CDATA["
_CDATA_SECTION: Final = re.compile(rb"<!\[CDATA\[.*?\]\]>", re.DOTALL)
#: An entity reference other than the five predefined ones and character
#: references (RFC 6120 section 11.1): there is no DTD to declare others.
_FORBIDDEN_REFERENCE: Final = re.compile(rb"&(?!(?:lt|gt|amp|quot|apos|#[0-9]+|#x[0-9A-Fa-f]+);)")
#: Octets fed to one lxml parser before it is replaced.
_PARSER_LIFETIME: Final = 1 << 20


def _markup_name(head: bytes) -> str:
    """What a ``<!`` or ``<?`` construct is, for the error reason."""
    if head.startswith(b"<!--"):
        return "a comment"
    if head.startswith(b"<!"):
        return "a DTD or entity declaration"
    return "a processing instruction"


def _new_parser() -> etree.XMLPullParser:
    return etree.XMLPullParser(
        events=("start", "end"),
        encoding="utf-8",
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        huge_tree=False,
        collect_ids=False,
    )


def _not_well_formed(reason: str) -> XMLStreamError:
    return XMLStreamError(StreamErrorCondition.NOT_WELL_FORMED, reason)


class XMLStreamReader:
    """Reads one direction of an XMPP session, stream after stream.

    ``feed`` bytes, then call ``next_token`` until it returns ``None``. It raises
    ``XMLStreamError`` when the stream must end; the reader is then unusable.
    After a restart (STARTTLS, SASL success: RFC 6120 sections 5.4.3.3 and
    6.4.6) call ``restart``: the next token is a new stream header.
    """

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._buffer = bytearray()
        self._steps: dict[_Mode, Callable[[], Token | bool]] = {
            _Mode.DECLARATION: self._declaration,
            _Mode.START_TAG: self._start_tag,
            _Mode.END_TAG: self._end_tag,
            _Mode.CDATA: self._cdata,
        }
        self.restart()

    def restart(self) -> None:
        """Expect a new stream header; bytes already fed are kept for it."""
        #: The current token is always ``_buffer[:_pos]`` scanned so far.
        self._pos = 0
        self._mode = _Mode.CONTENT
        self._in_header = True
        #: Where ``<stream:stream`` starts inside the header token.
        self._header_tag_start = 0
        #: Open elements below the root.
        self._depth = 0
        self._quote: int | None = None
        self._value_start = 0
        self._ended = False
        self._header_tag = b""
        self._parser: etree.XMLPullParser | None = None
        self._root: etree._Element | None = None
        self._fed = 0

    def discard(self) -> bytes:
        """Drop and return everything fed and not yet returned as a token."""
        rest = bytes(self._buffer)
        self._buffer.clear()
        self.restart()
        return rest

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def next_token(self) -> Token | None:
        """The next complete token, or ``None`` until more bytes are fed."""
        if self._ended:
            if self._buffer:
                raise _not_well_formed("data after the end of the stream")
            return None
        while True:
            if self._mode is _Mode.CONTENT:
                step = self._content if self._depth else self._between_tokens
            else:
                step = self._steps[self._mode]
            outcome = step()
            if outcome is False:
                if len(self._buffer) > self.limits.max_stanza_size:
                    raise self._too_large()
                return None
            if outcome is not True:
                return outcome

    # ------------------------------------------------------------------
    # The scanner. Each step returns a token, True to go on, or False when
    # it needs more bytes (having scanned all it has).

    def _too_large(self) -> XMLStreamError:
        return XMLStreamError(
            StreamErrorCondition.POLICY_VIOLATION,
            f"element larger than {self.limits.max_stanza_size} bytes",
        )

    def _between_tokens(self) -> Token | bool:
        buffer, pos = self._buffer, self._pos
        blank_end = _WHITESPACE.match(buffer, pos).end()  # type: ignore[union-attr]
        if blank_end > pos:
            if not self._in_header:
                return Whitespace(self._take(blank_end))
            if pos == 0:
                # Before a stream header: nothing to relay.
                del buffer[:blank_end]
            else:
                self._pos = blank_end
            return True
        if len(buffer) - pos < 2:
            return False
        if buffer[pos] != _LT:
            if self._in_header:
                raise _not_well_formed("the stream does not start with a tag")
            raise XMLStreamError(StreamErrorCondition.BAD_FORMAT, "text at the stream level")
        second = buffer[pos + 1]
        if second == _QUESTION and self._in_header and pos == 0:
            self._mode = _Mode.DECLARATION
        elif second in (_BANG, _QUESTION):
            raise XMLStreamError(
                StreamErrorCondition.RESTRICTED_XML, _markup_name(bytes(buffer[pos : pos + 4]))
            )
        elif second == _SLASH:
            if self._in_header:
                raise _not_well_formed("an end tag instead of the stream header")
            self._mode = _Mode.END_TAG
            self._pos = pos + 2
        else:
            if self._in_header:
                self._header_tag_start = pos
            self._mode = _Mode.START_TAG
            self._pos = pos + 1
        return True

    def _declaration(self) -> Token | bool:
        buffer = self._buffer
        end = buffer.find(b"?>")
        if end < 0:
            if len(buffer) > _MAX_DECLARATION:
                raise _not_well_formed("XML declaration too long")
            return False
        declaration = bytes(buffer[: end + 2])
        match = _XML_DECLARATION.fullmatch(declaration)
        if match is None:
            if re.match(rb"<\?xml[ \t\r\n]", declaration):
                raise _not_well_formed("malformed XML declaration")
            raise XMLStreamError(StreamErrorCondition.RESTRICTED_XML, "a processing instruction")
        if match[3] is not None and match[3].lower() != b"utf-8":
            raise XMLStreamError(
                StreamErrorCondition.UNSUPPORTED_ENCODING,
                f"encoding {match[3].decode('ascii')} (XMPP is UTF-8 only)",
            )
        self._pos = end + 2
        self._mode = _Mode.CONTENT
        return True

    def _content(self) -> Token | bool:
        buffer = self._buffer
        lt = buffer.find(b"<", self._pos)
        if lt < 0 or len(buffer) - lt < 2:
            self._pos = len(buffer) if lt < 0 else lt
            return False
        second = buffer[lt + 1]
        if second == _SLASH:
            self._mode = _Mode.END_TAG
            self._pos = lt + 2
        elif second == _BANG:
            head = bytes(buffer[lt : lt + len(_CDATA_OPEN)])
            if head == _CDATA_OPEN:
                self._mode = _Mode.CDATA
                self._pos = lt + len(_CDATA_OPEN)
            elif _CDATA_OPEN.startswith(head):
                self._pos = lt
                return False
            else:
                raise XMLStreamError(StreamErrorCondition.RESTRICTED_XML, _markup_name(head))
        elif second == _QUESTION:
            raise XMLStreamError(StreamErrorCondition.RESTRICTED_XML, "a processing instruction")
        else:
            self._mode = _Mode.START_TAG
            self._pos = lt + 1
        return True

    def _cdata(self) -> Token | bool:
        buffer = self._buffer
        end = buffer.find(b"]]>", self._pos)
        if end < 0:
            # The terminator may straddle the next feed.
            self._pos = max(self._pos, len(buffer) - 2)
            return False
        self._pos = end + 3
        self._mode = _Mode.CONTENT
        return True

    def _start_tag(self) -> Token | bool:
        buffer, limit = self._buffer, self.limits.max_attribute_size
        pos = self._pos
        while True:
            if self._quote is not None:
                end = buffer.find(self._quote, pos)
                if (len(buffer) if end < 0 else end) - self._value_start > limit:
                    raise XMLStreamError(
                        StreamErrorCondition.POLICY_VIOLATION,
                        f"attribute value longer than {limit} bytes",
                    )
                if end < 0:
                    self._pos = len(buffer)
                    return False
                self._quote = None
                pos = end + 1
                continue
            match = _TAG_MARKUP.search(buffer, pos)
            if match is None:
                self._pos = len(buffer)
                return False
            char = buffer[match.start()]
            if char == _LT:
                raise _not_well_formed("'<' inside a tag")
            if char != ord(">"):
                self._quote = char
                self._value_start = pos = match.end()
                continue
            self._pos = match.end()
            self._mode = _Mode.CONTENT
            return self._tag_closed(empty=buffer[match.start() - 1] == _SLASH)

    def _tag_closed(self, *, empty: bool) -> Token | bool:
        if self._in_header:
            if empty:
                raise _not_well_formed("the stream header closes the stream at once")
            return self._header()
        depth = self._depth + 1
        if depth > self.limits.max_depth:
            raise XMLStreamError(
                StreamErrorCondition.POLICY_VIOLATION,
                f"elements nested deeper than {self.limits.max_depth}",
            )
        if not empty:
            self._depth = depth
            return True
        return self._element() if self._depth == 0 else True

    def _end_tag(self) -> Token | bool:
        end = self._buffer.find(b">", self._pos)
        if end < 0:
            self._pos = len(self._buffer)
            return False
        self._pos = end + 1
        self._mode = _Mode.CONTENT
        if self._depth == 0:
            return self._stream_end()
        self._depth -= 1
        return self._element() if self._depth == 0 else True

    # ------------------------------------------------------------------
    # Complete tokens, handed to lxml.

    def _take(self, end: int) -> bytes:
        token = bytes(self._buffer[:end])
        del self._buffer[:end]
        self._pos = 0
        return token

    def _take_token(self) -> bytes:
        if self._pos > self.limits.max_stanza_size:
            raise self._too_large()
        return self._take(self._pos)

    def _feed_parser(self, data: bytes) -> list[tuple[str, etree._Element]]:
        assert self._parser is not None
        if b"&" in data and _FORBIDDEN_REFERENCE.search(_CDATA_SECTION.sub(b"", data)):
            raise XMLStreamError(
                StreamErrorCondition.RESTRICTED_XML, "an entity reference without a declaration"
            )
        try:
            self._parser.feed(data)
            # Only start and end events were asked for: they carry elements.
            events: list[tuple[str, etree._Element]] = [
                (event, node)
                for event, node in self._parser.read_events()
                if isinstance(node, etree._Element)
            ]
        except etree.XMLSyntaxError as error:
            raise _not_well_formed(f"not well-formed: {error.msg}") from None
        self._fed += len(data)
        return events

    def _open_parser(self) -> etree._Element:
        self._parser = _new_parser()
        self._fed = 0
        events = self._feed_parser(self._header_tag)
        if len(events) != 1 or events[0][0] != "start":
            raise _not_well_formed("malformed stream header")
        self._root = events[0][1]
        _check_prefixes(self._root)
        return self._root

    def _header(self) -> StreamHeader:
        raw = self._take_token()
        self._header_tag = raw[self._header_tag_start :]
        self._in_header = False
        return StreamHeader(raw, self._open_parser())

    def _element(self) -> StreamElement:
        raw = self._take_token()
        if self._fed > _PARSER_LIFETIME:
            self._open_parser()
        root = self._root
        assert root is not None
        # The previous element is done with; detached, it lives on while referenced.
        del root[:]
        events = self._feed_parser(raw)
        if not events or events[-1][0] != "end" or len(root) != 1 or events[-1][1] is not root[0]:
            # libxml2 skips the rest of an element it could not parse without
            # always raising; the scanner saw the element end, so it is broken.
            raise _not_well_formed("malformed element")
        element = root[0]
        for node in element.iter():
            _check_prefixes(node)
        return StreamElement(raw, element)

    def _stream_end(self) -> StreamEnd:
        raw = self._take_token()
        events = self._feed_parser(raw)
        if [event for event, _ in events] != ["end"] or events[0][1] is not self._root:
            raise _not_well_formed("malformed stream end")
        self._ended = True
        return StreamEnd(raw)


def _check_prefixes(node: etree._Element) -> None:
    """libxml2 only warns about an undeclared prefix: XMPP needs namespace
    well-formedness (RFC 6120 section 11.2)."""
    names = [node.tag, *node.attrib.keys()] if isinstance(node.tag, str) else []
    for name in names:
        if ":" in name and not name.startswith("{"):
            raise _not_well_formed(f"undeclared namespace prefix in {name!r}")


# --------------------------------------------------------------------------
# Stream-level markup the proxy writes itself.


def _attribute(value: str) -> bytes:
    return b'"%s"' % html.escape(value, quote=True).encode()


def stream_header(
    content_namespace: str,
    *,
    sender: str | None = None,
    recipient: str | None = None,
    stream_id: str | None = None,
    dialback: bool = False,
) -> bytes:
    """An opening stream header with the XML declaration (RFC 6120 section 4.7)."""
    attributes = [
        b"xmlns=%s" % _attribute(content_namespace),
        b"xmlns:stream=%s" % _attribute(NS_STREAMS),
    ]
    if dialback:
        attributes.append(b"xmlns:db=%s" % _attribute(NS_DIALBACK))
    for name, value in (("id", stream_id), ("from", sender), ("to", recipient)):
        if value is not None:
            attributes.append(b"%s=%s" % (name.encode(), _attribute(value)))
    attributes.append(b'version="1.0"')
    return b"<?xml version='1.0'?><stream:stream %s>" % b" ".join(attributes)


#: The longest ``<text/>`` of the proxy's stream errors, in characters.
STREAM_ERROR_TEXT_LIMIT: Final = 200
#: Line ends and tabs: a text is one line.
_TEXT_BREAKS: Final = re.compile("[\t\n\r]+")
#: What a text may not hold: characters XML 1.0 forbids (its production [2]
#: Char: C0 controls, lone surrogates, U+FFFE and U+FFFF) and those it
#: discourages (DEL, C1 controls).
_UNFIT_TEXT: Final = re.compile("[^\x20-\x7e\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def error_text(text: str) -> str:
    """``text`` as a stream error's ``<text/>`` carries it, before escaping:
    one line, without the characters XML forbids or discourages (each
    becomes U+FFFD), at most ``STREAM_ERROR_TEXT_LIMIT`` characters (a
    longer one is cut and ends with an ellipsis)."""
    clean = _UNFIT_TEXT.sub("\ufffd", _TEXT_BREAKS.sub(" ", text)).strip()
    if len(clean) > STREAM_ERROR_TEXT_LIMIT:
        clean = clean[: STREAM_ERROR_TEXT_LIMIT - 1] + "\u2026"
    return clean


def stream_error(
    condition: StreamErrorCondition,
    closing_tag: bytes = b"</stream:stream>",
    *,
    text: str | None = None,
) -> bytes:
    """A stream error and the end of the stream (RFC 6120 section 4.9).

    The error declares the streams namespace itself: after TLS the client's
    stream was opened by the backend's header, whatever prefix it chose.
    ``text``, for the peer's administrator, follows the condition as
    ``<text xml:lang='en'/>`` (section 4.9.2), made fit by ``error_text``
    and escaped: it may hold what the peer sent.
    """
    fit = error_text(text) if text is not None else ""
    described = (
        b"<text xmlns='%s' xml:lang='en'>%s</text>"
        % (NS_STREAM_ERRORS.encode(), html.escape(fit, quote=False).encode())
        if fit
        else b""
    )
    return b"<stream:error xmlns:stream='%s'><%s xmlns='%s'/>%s</stream:error>%s" % (
        NS_STREAMS.encode(),
        condition.value.encode(),
        NS_STREAM_ERRORS.encode(),
        described,
        closing_tag,
    )
