"""What ``--check-backends`` makes of its observations: rows, findings, and
for each problem the fix written out for the server that has it."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from lxml import etree

from protocols._base import BackendIdentity, RemoteProtocolError, SessionSettings
from protocols._buffers import LineBuffer
from protocols.imap_syntax import capability_atoms
from protocols.smtp import ReplyReader
from starttls_proxy.config import Protocol
from starttls_proxy.proxy.doctor import CLIENT, Observation, RoutesObservation

_PROXY_HEADERS = frozenset({BackendIdentity.PROXY_V1, BackendIdentity.PROXY_V2})
_FEATURES = re.compile(rb"<(?:stream:)?features\b.*?</(?:stream:)?features>", re.DOTALL)
_STREAM_PREFIX = b"<w xmlns:stream='http://etherx.jabber.org/streams'>"
_XML_DECLARATION = re.compile(rb"^<\?xml[^>]*\?>")
_STREAM_ERROR = re.compile(rb"<(?:stream:)?error\b[^>]*>\s*<([\w-]+)")
_PRODUCTS = {"postfix": "Postfix", "dovecot": "Dovecot", "process-one": "ejabberd"}

#: Fixes by what went wrong, then by server ("" for one that said not who
#: it is); ``{own}`` is the proxy's address as the backend saw it.
_UNKNOWN_XMPP = "Prosody or ejabberd"
FIXES: dict[str, dict[str, str]] = {
    "proxy-unexpected": {
        "Postfix": "Postfix: -o smtpd_upstream_proxy_protocol=haproxy on this smtpd service "
        "in master.cf (or backend.identity: xclient)",
        "Dovecot": "Dovecot: haproxy = yes in this inet_listener, and "
        "haproxy_trusted_networks = {own}",
        _UNKNOWN_XMPP: "ejabberd: use_proxy_protocol: true on this listener; Prosody reads no "
        "PROXY header (short of the community module mod_net_proxy): backend.identity: none",
        "": "make the backend expect a PROXY header on this port, or backend.identity: none",
    },
    "proxy-refused": {
        "Dovecot": "Dovecot: haproxy_trusted_networks = {own}",
        "": "the backend closed the connection after the PROXY header: let it trust {own} "
        "for PROXY headers (Dovecot: haproxy_trusted_networks = {own})",
    },
    "proxy-required": {
        "": "if this port expects a PROXY header (Postfix smtpd_upstream_proxy_protocol, "
        "Dovecot haproxy = yes, ejabberd use_proxy_protocol), set backend.identity: "
        "proxy-v2 or use a port without it",
    },
    "xclient": {
        "Postfix": "Postfix: add {own} to smtpd_authorized_xclient_hosts (main.cf, or -o on "
        "this smtpd service in master.cf)",
        "Dovecot": "Dovecot: add {own} to login_trusted_networks",
        "": "let the backend accept XCLIENT from {own}",
    },
    "login": {
        "Dovecot": "Dovecot: login_trusted_networks = {own} (the proxy's connections then "
        "count as secured)",
        "Dovecot proxy-v1": "PROXY v1 cannot tell Dovecot that the client used TLS: "
        "backend.identity: proxy-v2 (its SSL TLV does)",
        "ejabberd": "ejabberd: starttls_required: false on this listener (the proxy's hop "
        "is plaintext)",
        _UNKNOWN_XMPP: "Prosody: c2s_require_encryption = false; ejabberd: "
        "starttls_required: false on this listener (the proxy's hop is plaintext)",
        "": "let the backend accept logins over plaintext from {own}",
    },
}


OWN_STARTTLS = (
    "the backend offers its own STARTTLS: the proxy hides it from clients, but this port "
    "is set up for direct clients; keep it unreachable from outside"
)


@dataclass(frozen=True)
class Finding:
    problem: bool
    text: str
    fix: str = ""


@dataclass
class Verdict:
    """One listener's rows of the table."""

    name: str
    rows: list[tuple[str, str]] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)

    @property
    def usable(self) -> bool:
        return not any(finding.problem for finding in self.findings)


def _text(data: bytes, limit: int = 100) -> str:
    line = _XML_DECLARATION.sub(b"", data).split(b"\n", 1)[0].decode("utf-8", "replace").strip()
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _lines(data: bytes) -> list[bytes]:
    buffer = LineBuffer(SessionSettings.max_reply_line_length)
    buffer.feed(data)
    lines = []
    while isinstance(line := buffer.pop_line(), bytes):
        lines.append(line)
    return lines


def _smtp(data: bytes) -> list[str] | None:
    """The extensions of the last EHLO reply in ``data``."""
    reader, found = ReplyReader(SessionSettings.max_reply_line_length), None
    reader.feed(data)
    try:
        while (reply := reader.pop()) is not None:
            if reply.code == 250 and len(reply.lines) > 1:
                found = [text.decode("utf-8", "replace") for text in reply.texts[1:]]
    except RemoteProtocolError:
        pass
    return found


def _imap(data: bytes) -> list[str] | None:
    found = None
    for line in _lines(data):
        atoms = capability_atoms(line)
        if atoms is not None:
            found = [atom.decode("utf-8", "replace") for atom in atoms]
    return found


def _pop3(data: bytes) -> list[str] | None:
    """The lines of the last complete multi-line ``+OK`` answer (CAPA's)."""
    found: list[str] | None = None
    block: list[bytes] | None = None
    for line in _lines(data):
        if line.startswith((b"+OK", b"-ERR")):
            block = [] if line.startswith(b"+OK") else None
        elif block is not None and line == b".\r\n":
            found, block = [item.decode("utf-8", "replace").strip() for item in block], None
        elif block is not None:
            block.append(line)
    return found


def _xmpp(data: bytes) -> list[str] | None:
    """The last ``<stream:features>``, one word per feature."""
    matches = _FEATURES.findall(data)
    if not matches:
        return None
    parser = etree.XMLParser(resolve_entities=False, no_network=True)
    try:
        features = etree.fromstring(_STREAM_PREFIX + matches[-1] + b"</w>", parser)[0]
    except (etree.XMLSyntaxError, IndexError):
        return None
    words = []
    for child in features:
        name = etree.QName(child).localname
        inner = [etree.QName(node).localname for node in child if node.text is None]
        mechanisms = [(node.text or "").strip() for node in child if node.text]
        words.append(" ".join([name.upper() if name == "starttls" else name, *inner]))
        words.extend(f"SASL {mechanism}" for mechanism in mechanisms if name == "mechanisms")
    return words


CAPABILITIES = {
    Protocol.SMTP: _smtp,
    Protocol.IMAP: _imap,
    Protocol.POP3: _pop3,
    Protocol.XMPP_CLIENT: _xmpp,
    Protocol.XMPP_SERVER: _xmpp,
}


def _product(seen: Observation) -> str:
    said = (seen.unasked + seen.backend_said).lower()
    for mark, name in _PRODUCTS.items():
        if mark.encode() in said:
            return name
    return _UNKNOWN_XMPP if seen.listener.protocol.value.startswith("xmpp") else ""


def _fix(kind: str, seen: Observation, variant: str = "") -> str:
    fixes, product = FIXES[kind], _product(seen)
    text = fixes.get(f"{product} {variant}") or fixes.get(product) or fixes[""]
    return text.format(own=seen.own_address or "the proxy's address")


def _login(seen: Observation, backend: list[str]) -> tuple[str, Finding | None]:
    """Whether the user's login can cross the relayed plaintext."""
    protocol, names = seen.listener.protocol, {name.upper() for name in backend}
    auth = [name for name in backend if name.upper().startswith(("AUTH", "SASL"))]
    variant = seen.listener.fixed_backend.identity.value
    if protocol is Protocol.SMTP:
        if auth:
            return " ".join(auth), None
        return "no AUTH offered", Finding(
            False,
            "the backend offers no AUTH to the proxy's sessions: fine for an MX; for "
            "submission, Postfix: smtpd_sasl_auth_enable = yes and smtpd_tls_auth_only = no",
        )
    if protocol is Protocol.IMAP and "LOGINDISABLED" in names:
        return "refused (LOGINDISABLED)", Finding(
            True,
            "the backend advertises LOGINDISABLED to the proxy's sessions: the users' LOGIN "
            "will fail",
            _fix("login", seen, variant),
        )
    if protocol is Protocol.POP3 and not ({"USER"} & names or auth):
        return "refused (no USER, no SASL)", Finding(
            True,
            "the backend offers no USER and no SASL: the users' login will fail",
            _fix("login", seen, variant),
        )
    if protocol is Protocol.XMPP_CLIENT and not auth:
        return "refused (no SASL mechanisms)", Finding(
            True,
            "the backend offers no SASL mechanism over the proxy's plaintext: the users' "
            "login will fail",
            _fix("login", seen, variant),
        )
    return " ".join(auth) or "LOGIN", None


def _identity(seen: Observation) -> tuple[str, Finding | None]:
    """How the client's identity fared; a problem when the session failed."""
    identity = seen.listener.fixed_backend.identity
    if seen.unasked:
        return "refused", Finding(
            True,
            f"the backend greets before any PROXY header ({_text(seen.unasked, 60)}): it "
            "does not expect one and would read the header as a command",
            _fix("proxy-unexpected", seen),
        )
    if seen.clean:
        answer = {
            BackendIdentity.NONE: f"none: the backend sees every client as {seen.own_address}",
            BackendIdentity.XCLIENT: f"accepted: XCLIENT ADDR={CLIENT} answered 220",
            BackendIdentity.IMAP_ID: "ID sent (Dovecot honours it from login_trusted_networks)",
            BackendIdentity.POP3_XCLIENT: f"accepted: XCLIENT ADDR={CLIENT} answered +OK",
        }
        return answer.get(identity, f"accepted: greeted after the {identity.value} header"), None
    if "XCLIENT" in seen.ended:
        return "refused", Finding(True, seen.ended, _fix("xclient", seen))
    if not seen.backend_said or seen.listener.protocol.value.startswith("xmpp"):
        if identity in _PROXY_HEADERS:
            kind = "proxy-unexpected" if _product(seen) == _UNKNOWN_XMPP else "proxy-refused"
            return "refused", Finding(True, f"no session: {seen.ended}", _fix(kind, seen))
        if not seen.backend_said:
            return "no greeting", Finding(
                True, f"no greeting: {seen.ended}", _fix("proxy-required", seen)
            )
    return "failed", Finding(True, f"the session failed: {seen.ended}")


def _stream_error(seen: Observation) -> None:
    """An XMPP stream error ends the stream in good order, yet the session failed."""
    error = _STREAM_ERROR.search(seen.backend_said)
    if error is not None:
        seen.clean, seen.ended = False, f"backend stream error: {error[1].decode()}"


def judge_routes(seen: RoutesObservation) -> Verdict:
    """An outgoing listener: where its streams go, and its static routes."""
    listener = seen.listener
    assert listener.routes is not None
    servers = ", ".join(str(server) for server in listener.routes.nameservers)
    verdict = Verdict(listener.name)
    verdict.rows.append(
        (
            "routes",
            f"no backend ({listener.protocol.value}): remote domains by SRV, A and AAAA "
            f"through {servers or 'the system resolver (/etc/resolv.conf)'}"
            + (", the static routes first" if seen.reached else ""),
        )
    )
    for domain, address, problem in seen.reached:
        verdict.rows.append(("static route", f"{domain}: {address}, {problem or 'reachable'}"))
        if problem is not None:
            verdict.findings.append(
                Finding(
                    True,
                    f"static route of {domain} unreachable: {address}: {problem}",
                    "start that server, or correct routes.static",
                )
            )
    return verdict


def judge(seen: Observation | RoutesObservation) -> Verdict:
    if isinstance(seen, RoutesObservation):
        return judge_routes(seen)
    listener = seen.listener
    _stream_error(seen)
    verdict = Verdict(listener.name)
    rows = verdict.rows
    rows.append(
        (
            "backend",
            f"{listener.fixed_backend.address} ({listener.protocol.value}, "
            f"identity {listener.fixed_backend.identity.value})",
        )
    )
    if seen.unreachable is not None:
        rows.append(("reachable", f"NO: {seen.unreachable}"))
        verdict.findings.append(
            Finding(
                True,
                f"backend unreachable: {seen.unreachable}",
                "start the backend, or correct backend.address",
            )
        )
        return verdict
    rows.append(("reachable", f"yes, from {seen.own_address}"))
    rows.append(("greeting", _text(seen.backend_said) or "none"))
    read = CAPABILITIES[listener.protocol]
    backend = read(seen.backend_said) or list(seen.probed or ())
    rows.append(("capabilities", " ".join(backend) or seen.probe_error or "-"))
    rows.append(("advertised", f"before TLS: {' '.join(read(seen.client_before) or ()) or '-'}"))
    rows.append(("", f"after TLS: {' '.join(read(seen.client_got) or ()) or '-'}"))
    state, finding = _identity(seen)
    rows.append(("identity", state))
    verdict.findings += [finding] if finding is not None else []
    if seen.clean:
        state, finding = _login(seen, backend)
        rows.append(("login", state))
        verdict.findings += [finding] if finding is not None else []
    if any(name.upper() in ("STARTTLS", "STLS", "STARTTLS REQUIRED") for name in backend):
        verdict.findings.append(Finding(False, OWN_STARTTLS))
    return verdict


def table(verdicts: list[Verdict]) -> str:
    """One table: a row per check and per finding, the fixes under their problems."""
    lines: list[tuple[str, str, str]] = []
    for verdict in verdicts:
        for check, result in verdict.rows:
            lines.append((verdict.name, check, result))
        for finding in verdict.findings:
            lines.append((verdict.name, "PROBLEM" if finding.problem else "note", finding.text))
            if finding.fix:
                lines.append((verdict.name, "fix", finding.fix))
        lines.append((verdict.name, "verdict", "usable" if verdict.usable else "NOT USABLE"))
    name_width = max([len("listener"), *(len(name) for name, _, _ in lines)])
    check_width = max(len(check) for _, check, _ in lines)
    rendered = [f"{'listener':<{name_width}}  {'check':<{check_width}}  result"]
    rendered += [f"{n:<{name_width}}  {c:<{check_width}}  {r}" for n, c, r in lines]
    return "\n".join(rendered)
