"""The YAML configuration: one frozen pydantic model tree and one loader.

The ``tls`` and ``isolation`` sections are plain dataclasses of ``settings``
(the root processes read them without pydantic); pydantic validates them
here like the rest.

Everything is resolved at load time (addresses parsed, protocol defaults
filled in) so the rest of the program never looks at raw strings. Problems
are reported one per line, each naming its YAML path
(``listeners[0].backend.address: ...``).
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import socket
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from protocols._base import BackendIdentity, BareLineEndings, PeerCertificateFailure, TLSMode
from protocols.facts import FACTS, ProtocolFacts
from starttls_proxy.settings import (
    CertificateConfig,
    ConfigError,
    IsolationConfig,
    TLSConfig,
)
from starttls_proxy.wire import MAX_HANDSHAKE_TIMEOUT, MAX_TRUST_STORES, encode_alpn


class Protocol(enum.Enum):
    SMTP = "smtp"
    IMAP = "imap"
    POP3 = "pop3"
    XMPP_CLIENT = "xmpp-client"
    XMPP_SERVER = "xmpp-server"
    #: Outgoing server-to-server streams: the local server connects in
    #: plaintext, the proxy connects out with TLS (``routes``).
    XMPP_SERVER_OUT = "xmpp-server-out"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SocketAddress(_Model):
    """A TCP ``host:port`` / ``[v6]:port`` or a ``unix:/path`` address."""

    host: str = ""
    port: int = 0
    #: Set for ``unix:/path`` addresses, which have no host and port.
    unix_path: str | None = None

    @classmethod
    def parse(cls, text: str, *, allow_unix: bool) -> SocketAddress:
        if text.startswith("unix:"):
            if not allow_unix:
                raise ValueError("unix sockets are not supported here")
            path = text.removeprefix("unix:")
            if not path.startswith("/"):
                raise ValueError(f"unix socket path must be absolute: {text!r}")
            return cls(unix_path=path)
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"expected host:port or [v6]:port, got {text!r}")
        if host.startswith("["):
            if not host.endswith("]"):
                raise ValueError(f"unbalanced brackets in {text!r}")
            host = host[1:-1]
            ipaddress.IPv6Address(host)
        elif ":" in host:
            raise ValueError(f"IPv6 addresses need brackets: [{host}]:{port_text}")
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"port must be 1-65535, got {port_text!r}")
        return cls(host=host, port=int(port_text))

    def __str__(self) -> str:
        if self.unix_path is not None:
            return f"unix:{self.unix_path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


class BackendConfig(_Model):
    #: Where decrypted sessions go: ``host:port`` or ``unix:/path``.
    address: SocketAddress
    #: How the backend learns the client's address and TLS status.
    identity: BackendIdentity = BackendIdentity.NONE
    #: Seconds between capability probes (the pre-TLS EHLO/CAPABILITY/CAPA
    #: lists are the backend's real ones).
    probe_interval: Annotated[float, Field(gt=0)] = 300.0

    @field_validator("address", mode="before")
    @classmethod
    def _parse_address(cls, value: object) -> object:
        return SocketAddress.parse(value, allow_unix=True) if isinstance(value, str) else value


class StaticRoute(_Model):
    """One address an outgoing stream to a domain may go to."""

    address: SocketAddress
    #: ``starttls`` (RFC 6120 section 5) or ``implicit`` (XEP-0368 direct TLS).
    tls: TLSMode = TLSMode.STARTTLS

    @field_validator("address", mode="before")
    @classmethod
    def _parse_address(cls, value: object) -> object:
        return SocketAddress.parse(value, allow_unix=False) if isinstance(value, str) else value

    @property
    def direct_tls(self) -> bool:
        return self.tls is TLSMode.IMPLICIT


class RoutesConfig(_Model):
    """``xmpp-server-out``: where the remote domains' servers are."""

    #: Domains reached at these addresses, tried in order, instead of by
    #: their SRV records.
    static: dict[str, tuple[StaticRoute, ...]] = {}
    #: Name servers (``host`` or ``host:port``) for SRV, A and AAAA
    #: lookups; empty: the system's (``/etc/resolv.conf``).
    nameservers: tuple[SocketAddress, ...] = ()

    @field_validator("nameservers", mode="before")
    @classmethod
    def _parse_nameservers(cls, value: object) -> object:
        if not isinstance(value, list | tuple):
            return value
        return tuple(_nameserver(text) if isinstance(text, str) else text for text in value)

    @field_validator("static")
    @classmethod
    def _static_domains(
        cls, value: dict[str, tuple[StaticRoute, ...]]
    ) -> dict[str, tuple[StaticRoute, ...]]:
        for domain, routes in value.items():
            if not routes:
                raise ValueError(f"{domain}: no address")
        return {domain.strip().rstrip(".").lower(): routes for domain, routes in value.items()}


def _nameserver(text: str) -> SocketAddress:
    """A name server's address: an IP address, with a port or on 53."""
    try:
        return SocketAddress(host=str(ipaddress.ip_address(text)), port=53)
    except ValueError:
        address = SocketAddress.parse(text, allow_unix=False)
    try:
        ipaddress.ip_address(address.host)
    except ValueError:
        raise ValueError(f"a name server is an IP address, not {address.host!r}") from None
    return address


class Timeouts(_Model):
    """Seconds. Every wait the proxy does on the network is bounded."""

    #: The whole exchange before TLS, from the greeting to the upgrade,
    #: however busy the client keeps it (a client that sends a byte now
    #: and then is cut all the same); ``pre_tls_idle`` is its former name.
    pre_tls: Annotated[
        float, Field(gt=0, validation_alias=AliasChoices("pre_tls", "pre_tls_idle"))
    ] = 60.0
    #: From the first byte of a command (a line, a stanza) to its last, in
    #: every phase; a message body or a literal on its way is not a command.
    command: Annotated[float, Field(gt=0)] = 60.0
    #: The whole TLS handshake, enforced by the worker and by the main process.
    handshake: Annotated[float, Field(gt=0, le=MAX_HANDSHAKE_TIMEOUT)] = 30.0
    #: Connecting the backend and getting through its greeting.
    backend_connect: Annotated[float, Field(gt=0)] = 10.0
    #: A relayed session with no traffic either way; ``null`` = protocol default.
    session_idle: Annotated[float, Field(gt=0)] | None = None


Networks = tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]


def _within(address: str, networks: Networks) -> bool:
    if not networks:
        return False
    client = ipaddress.ip_address(address)
    if isinstance(client, ipaddress.IPv6Address) and client.ipv4_mapped:
        client = client.ipv4_mapped
    return any(client in network for network in networks)


class Limits(_Model):
    #: Concurrent connections on this listener; beyond it clients get the
    #: protocol's "too busy" reply.
    max_connections: Annotated[int, Field(gt=0)] = 1000
    #: Concurrent connections from one client address, so that one client
    #: cannot take every slot (Postfix's smtpd_client_connection_count_limit).
    max_connections_per_client: Annotated[int, Field(gt=0)] = 50
    #: Addresses (CIDRs) that ``max_connections_per_client`` does not count:
    #: by default this host, where a webmail opens a connection per user (as
    #: Postfix's smtpd_client_event_limit_exceptions spares $mynetworks).
    per_client_exceptions: Networks = (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    #: Longest command line from a client, CRLF included; ``null`` = the
    #: protocol's default (``protocols.facts``).
    max_line_length: Annotated[int, Field(ge=512, le=1_048_576)] | None = None
    #: IMAP: largest literal ``{n}`` in either direction, in octets.
    max_literal_size: Annotated[int, Field(gt=0)] = 100 * 1024 * 1024
    #: XMPP: largest stanza (top-level element), in octets; ``null`` = the
    #: protocol's default (``protocols.facts``: 256 KiB for c2s, Prosody's
    #: c2s_stanza_size_limit; 512 KiB for s2s, its s2s_stanza_size_limit).
    max_stanza_size: Annotated[int, Field(ge=4096)] | None = None
    #: XMPP: deepest element nesting inside a stanza.
    max_xml_depth: Annotated[int, Field(ge=4, le=1000)] = 64
    #: XMPP: longest attribute value, in octets.
    max_attribute_size: Annotated[int, Field(ge=256)] = 64 * 1024

    def counts_per_client(self, address: str) -> bool:
        """Whether ``max_connections_per_client`` applies to ``address``."""
        return not _within(address, self.per_client_exceptions)


class SMTPOptions(_Model):
    #: Bare CR or LF inside DATA: ``reject`` (as Postfix 3.9, against SMTP
    #: smuggling) or ``allow``.
    bare_line_endings: BareLineEndings = BareLineEndings.REJECT


#: ``peer_certificates.trust: system``: Debian's bundle of the CAs that
#: ca-certificates trusts (update-ca-certificates writes it).
SYSTEM_TRUST = Path("/etc/ssl/certs/ca-certificates.crt")


class PeerCertificates(_Model):
    """``xmpp-server``: how a connecting server's certificate is judged."""

    #: A PEM file of the CA certificates to trust, or ``system``.
    trust: str = "system"
    #: A peer whose certificate does not verify for its stream's ``from``:
    #: ``dialback`` lets the stream through (the backend authenticates it by
    #: dialback, as without the proxy), ``refuse`` ends it with a stream error.
    on_failure: PeerCertificateFailure = PeerCertificateFailure.DIALBACK

    @property
    def trust_file(self) -> Path:
        return SYSTEM_TRUST if self.trust == "system" else Path(self.trust)


class ListenerConfig(_Model):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    protocol: Protocol
    listen: SocketAddress
    #: Several instances of the proxy on this host listen on ``listen``
    #: together and the kernel spreads new connections over them
    #: (SO_REUSEPORT): to use more cores, or more descriptors than one
    #: process may hold. Every instance must set it, run as the same user,
    #: and have its own ``isolation.uid_range``.
    reuse_port: bool = False
    tls: TLSMode = TLSMode.STARTTLS
    require_tls: bool = True
    #: Where sessions go; every protocol but ``xmpp-server-out`` has one.
    backend: BackendConfig | None = None
    #: ``xmpp-server-out``: how remote domains are found (default: DNS).
    routes: RoutesConfig | None = None
    #: Name used in the proxy's own greetings; default: this machine's name.
    hostname: str = Field(default_factory=socket.gethostname)
    #: Overrides the probed backend capabilities (EHLO keywords for SMTP,
    #: CAPABILITY atoms for IMAP, CAPA lines for POP3).
    capabilities: tuple[str, ...] | None = None
    #: XMPP: domains served; others get ``<host-unknown/>``. Empty = any.
    #: ``xmpp-server-out``: the domains the local server may send from.
    domains: tuple[str, ...] = ()
    #: ALPN protocols to offer on implicit TLS; ``null`` = protocol default
    #: (``xmpp-client`` / ``xmpp-server`` for XMPP direct TLS, none otherwise).
    alpn: tuple[str, ...] | None = None
    #: L4 load balancers (CIDRs) whose connections start with a PROXY v1/v2
    #: header naming the real client. Nobody else's header is honoured.
    trusted_proxies: Networks = ()
    timeouts: Timeouts = Timeouts()
    limits: Limits = Limits()
    smtp: SMTPOptions = SMTPOptions()
    #: ``xmpp-server``: the peer's certificate is asked for and verified
    #: (``null``: the proxy asks for none). ``xmpp-server-out``: the remote
    #: server's, always verified. Other protocols: ``null``.
    peer_certificates: PeerCertificates | None = None

    @field_validator("listen", mode="before")
    @classmethod
    def _parse_listen(cls, value: object) -> object:
        return SocketAddress.parse(value, allow_unix=False) if isinstance(value, str) else value

    @field_validator("alpn")
    @classmethod
    def _alpn_fits(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        # Every spawn request carries the list: one that does not fit would
        # fail each upgrade instead of the start.
        if value is not None:
            encode_alpn(value)
        return value

    @model_validator(mode="before")
    @classmethod
    def _server_to_server_defaults(cls, data: object) -> object:
        # Peers' certificates are checked on server-to-server listeners
        # unless set to null; outgoing ones resolve by DNS unless told.
        if not isinstance(data, dict):
            return data
        protocol = data.get("protocol")
        server = (Protocol.XMPP_SERVER.value, Protocol.XMPP_SERVER_OUT.value)
        if protocol in server and "peer_certificates" not in data:
            data = {**data, "peer_certificates": {}}
        if protocol == Protocol.XMPP_SERVER_OUT.value and "routes" not in data:
            data = {**data, "routes": {}}
        return data

    @model_validator(mode="after")
    def _check_outgoing(self) -> ListenerConfig:
        if self.protocol is not Protocol.XMPP_SERVER_OUT:
            if self.backend is None:
                raise ValueError("backend: required")
            if self.routes is not None:
                raise ValueError("routes is for xmpp-server-out listeners")
            return self
        if self.backend is not None:
            raise ValueError(
                "backend: an xmpp-server-out listener has none; its streams go where"
                " routes (or DNS) say"
            )
        if self.tls is not TLSMode.STARTTLS or not self.require_tls:
            raise ValueError(
                "an xmpp-server-out listener takes plaintext from the local server and"
                " always uses TLS towards the remote one: leave tls and require_tls as they are"
            )
        if self.peer_certificates is None:
            raise ValueError("peer_certificates: an outgoing stream's peer is always verified")
        return self

    @model_validator(mode="after")
    def _check_peer_certificates(self) -> ListenerConfig:
        peer = self.peer_certificates
        if peer is None:
            return self
        if self.protocol not in (Protocol.XMPP_SERVER, Protocol.XMPP_SERVER_OUT):
            raise ValueError("peer_certificates is for xmpp-server and xmpp-server-out listeners")
        if peer.on_failure is PeerCertificateFailure.REFUSE and not self.require_tls:
            raise ValueError(
                "peer_certificates.on_failure: refuse needs require_tls: a plaintext"
                " stream has no certificate"
            )
        return self

    @model_validator(mode="after")
    def _check_identity(self) -> ListenerConfig:
        if self.backend is None:
            return self
        identity = self.backend.identity
        proxy_headers = {BackendIdentity.NONE, BackendIdentity.PROXY_V1, BackendIdentity.PROXY_V2}
        if identity not in proxy_headers | self.facts.in_band_identities:
            raise ValueError(
                f"backend.identity {identity.value!r} is not available for {self.protocol.value}"
            )
        return self

    @property
    def facts(self) -> ProtocolFacts:
        """What this listener's protocol is (``protocols.facts``)."""
        return FACTS[self.protocol.value]

    @property
    def fixed_backend(self) -> BackendConfig:
        """The backend: every listener has one but ``xmpp-server-out``'s,
        whose streams go where their routes say."""
        if self.backend is None:
            raise ValueError(f"{self.name}: an {self.protocol.value} listener has no backend")
        return self.backend

    @property
    def session_idle(self) -> float:
        return self.timeouts.session_idle or self.facts.session_idle

    def trusts(self, address: str) -> bool:
        """Whether a connection from ``address`` comes through a trusted balancer."""
        return _within(address, self.trusted_proxies)

    @property
    def max_line_length(self) -> int:
        return self.limits.max_line_length or self.facts.max_line_length

    @property
    def max_stanza_size(self) -> int:
        return self.limits.max_stanza_size or self.facts.max_stanza_size

    @property
    def alpn_protocols(self) -> tuple[str, ...]:
        """What the worker may select on implicit TLS, or offers on an
        outgoing stream's direct TLS."""
        if self.alpn is not None:
            return self.alpn
        outgoing = self.protocol is Protocol.XMPP_SERVER_OUT
        return self.facts.alpn if self.tls is TLSMode.IMPLICIT or outgoing else ()


def resolve_trust(listener: ListenerConfig, base: Path) -> ListenerConfig:
    """``listener`` with its peer trust file relative to ``base``."""
    peer = listener.peer_certificates
    if peer is None or peer.trust == "system":
        return listener
    trust = str(base / peer.trust)
    return listener.model_copy(
        update={"peer_certificates": peer.model_copy(update={"trust": trust})}
    )


class MetricsConfig(_Model):
    #: ``host:port`` serving ``/metrics`` for Prometheus; ``null`` = off.
    listen: SocketAddress | None = None

    @field_validator("listen", mode="before")
    @classmethod
    def _parse_listen(cls, value: object) -> object:
        return SocketAddress.parse(value, allow_unix=False) if isinstance(value, str) else value


class ShutdownConfig(_Model):
    #: On SIGTERM/SIGINT, seconds to let sessions end by themselves before
    #: each gets its protocol's goodbye (421, * BYE, -ERR, </stream:stream>).
    drain_timeout: Annotated[float, Field(ge=0)] = 30.0


class Config(_Model):
    tls: TLSConfig
    listeners: Annotated[list[ListenerConfig], Field(min_length=1)]
    metrics: MetricsConfig = MetricsConfig()
    shutdown: ShutdownConfig = ShutdownConfig()
    isolation: IsolationConfig = IsolationConfig()

    @field_validator("tls", mode="before")
    @classmethod
    def _no_peer_trust(cls, value: object) -> object:
        if isinstance(value, dict) and "peer_trust" in value:
            raise ValueError(
                "peer_trust comes from the listeners' peer_certificates.trust; set it there"
            )
        return value

    @property
    def trust_stores(self) -> tuple[Path, ...]:
        """The peer trust files of the listeners, each once, in order: the
        TLS helper's trust stores 1, 2, ..."""
        files = (
            listener.peer_certificates.trust_file
            for listener in self.listeners
            if listener.peer_certificates is not None
        )
        return tuple(dict.fromkeys(files))

    @property
    def helper_tls(self) -> TLSConfig:
        """``tls`` as the TLS helper gets it: with the trust stores."""
        return dataclasses.replace(self.tls, peer_trust=self.trust_stores)

    @model_validator(mode="after")
    def _unique_listeners(self) -> Config:
        seen_names: set[str] = set()
        seen_addresses: set[str] = set()
        for listener in self.listeners:
            if listener.name in seen_names:
                raise ValueError(f"listener name {listener.name!r} is used twice")
            if str(listener.listen) in seen_addresses:
                raise ValueError(f"listen address {listener.listen} is used twice")
            seen_names.add(listener.name)
            seen_addresses.add(str(listener.listen))
        if len(self.trust_stores) > MAX_TRUST_STORES:
            raise ValueError(
                f"the listeners name more than {MAX_TRUST_STORES} peer_certificates.trust files"
            )
        return self


def _yaml_path(location: tuple[int | str, ...]) -> str:
    path = ""
    for part in location:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else part)
    return path or "(top level)"


def load_config(path: Path) -> Config:
    """Read and validate ``path``; raise ``ConfigError`` listing every problem.

    Relative certificate paths are resolved against the config file's folder.
    """
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError([f"{path}: cannot read: {error.strerror}"]) from None
    except yaml.YAMLError as error:
        raise ConfigError([f"{path}: not valid YAML: {error}"]) from None
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}: expected a mapping at the top level"])
    try:
        config = Config.model_validate(raw)
    except ValidationError as error:
        raise ConfigError([f"{_yaml_path(e['loc'])}: {e['msg']}" for e in error.errors()]) from None
    base = path.parent
    certificates = [
        CertificateConfig(cert=base / c.cert, key=base / c.key) for c in config.tls.certificates
    ]
    return config.model_copy(
        update={
            "tls": dataclasses.replace(config.tls, certificates=certificates),
            "listeners": [resolve_trust(listener, base) for listener in config.listeners],
        }
    )
