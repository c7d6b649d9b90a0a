"""The settings the root processes get: TLS certificates and isolation.

The keeper and the key server run as root for as long as the proxy does;
what they import is what an attacker who reached them would find, and
memory they hold for hours. So they do not import pydantic, the YAML parser
or the protocol machines (lxml among them). These sections of the
configuration are therefore plain frozen dataclasses, with their
constraints as ``annotated_types`` metadata:

* the main process validates them inside the pydantic ``Config`` (config);
* the keeper, which takes them from the unprivileged main process and
  starts root processes with them, validates them again (``checked``) and
  passes them on in canonical JSON (``encode``);
* the helper and the key server, started by the keeper, rebuild them
  from that JSON without validating again (``decode``).

Only ``checked`` and ``encode`` use pydantic; they import it when called.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from pathlib import Path, PurePath
from typing import Annotated, Any, ClassVar, Literal, TypeVar

import annotated_types as at

T = TypeVar("T")

#: Unknown keys are errors (a typo must not fall back to a default silently).
_FORBID_EXTRA: dict[str, str] = {"extra": "forbid"}


class ConfigError(Exception):
    """The configuration cannot be used; ``problems`` holds one line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class _ByteSize:
    """Annotated marker: a byte count, also written as ``64MiB``, ``1.5 GB``."""

    @staticmethod
    def __get_pydantic_core_schema__(source: Any, handler: Any) -> Any:
        from pydantic import ByteSize  # only where pydantic validates

        return handler(ByteSize)


BYTE_SIZE = _ByteSize()


@dataclasses.dataclass(frozen=True)
class CertificateConfig:
    __pydantic_config__: ClassVar[dict[str, str]] = _FORBID_EXTRA
    #: PEM chain, leaf first.
    cert: Path
    #: PEM private key matching the leaf. Only the TLS helper process reads it.
    key: Path


@dataclasses.dataclass(frozen=True)
class TLSConfig:
    __pydantic_config__: ClassVar[dict[str, str]] = _FORBID_EXTRA
    #: The first certificate is the default; the others are chosen by SNI.
    certificates: Annotated[list[CertificateConfig], at.MinLen(1)]
    min_version: Literal["1.2", "1.3"] = "1.2"
    #: CA files that peers' certificates are verified against, the TLS
    #: helper's trust stores 1, 2, ...: what the listeners'
    #: ``peer_certificates.trust`` name (``Config.helper_tls``), not a key of
    #: the YAML file's ``tls`` section.
    peer_trust: Annotated[tuple[Path, ...], at.MaxLen(16)] = ()


class IsolationMode(enum.Enum):
    #: Refuse to start unless every enabled layer works on this machine.
    STRICT = "strict"
    #: Start with the layers that work and log the missing ones.
    BEST_EFFORT = "best-effort"


@dataclasses.dataclass(frozen=True)
class IsolationLayers:
    """One switch per sandbox layer of the TLS workers (for debugging)."""

    __pydantic_config__: ClassVar[dict[str, str]] = _FORBID_EXTRA
    #: Empty network, IPC and UTS namespaces (one set, shared by the workers).
    namespaces: bool = True
    #: Own PID namespace (the worker is its PID 1).
    pid_namespace: bool = True
    #: chroot into an empty, unwritable directory.
    chroot: bool = True
    #: A UID and GID of ``uid_range`` per live worker (root only).
    identity: bool = True
    #: Not dumpable, no_new_privs, no core files, no fork, no new descriptors.
    hardening: bool = True
    #: ``memory_limit`` on the worker's address space.
    memory_limit: bool = True
    #: The seccomp-bpf allow-list.
    seccomp: bool = True


@dataclasses.dataclass(frozen=True)
class IsolationConfig:
    __pydantic_config__: ClassVar[dict[str, str]] = _FORBID_EXTRA
    mode: IsolationMode = IsolationMode.STRICT
    #: ``[first, count]``: UIDs (and equal GIDs) handed to live workers, one each.
    uid_range: tuple[Annotated[int, at.Ge(1)], Annotated[int, at.Ge(1)]] = (200_000, 65_536)
    #: Empty root-owned directory the workers are locked into (created 0555).
    chroot: Path = Path("/run/starttls-proxy/empty")
    #: Address space a worker may map beyond what it inherits from the helper.
    memory_limit: Annotated[int, BYTE_SIZE] = 64 * 1024 * 1024
    #: Workers forked ahead of time, waiting (sandboxed but for the descriptor
    #: limit and seccomp) for a connection: the fork leaves the upgrade's
    #: latency. Each holds a UID of ``uid_range`` and
    #: about 1.5 MiB of private memory; 0 = fork per connection when it upgrades.
    spare_workers: Annotated[int, at.Interval(ge=0, le=256)] = 2
    #: User the main process becomes once its sockets are bound; ``null`` = stay.
    main_user: str | None = "nobody"
    #: The TLS helper may die this many times within ``restart_window``
    #: seconds; one more makes the proxy exit (status 3) instead of spinning.
    max_helper_restarts: Annotated[int, at.Ge(0)] = 5
    restart_window: Annotated[float, at.Gt(0)] = 60.0
    layers: IsolationLayers = IsolationLayers()
    #: Keep the private keys in a key server process of their own (the last
    #: UID of ``uid_range``, chroot, seccomp) that signs for the workers; with
    #: ``false`` they are in the TLS helper's memory (weaker: a worker's
    #: memory then holds them too).
    key_server: bool = True
    #: TEST ONLY: every worker checks its own sandbox after entering it and
    #: logs the result; a client whose SNI is ``forbidden-syscall.self-test``
    #: makes its worker call a forbidden system call after the handshake.
    self_test: bool = False

    def __post_init__(self) -> None:
        first, count = self.uid_range
        if first + count > 2**32 - 2:
            raise ValueError("uid_range goes beyond the largest UID")


# ----------------------------------------------------------------------
# Passing them on.


def checked(kind: type[T], data: object, where: str) -> T:
    """``data`` validated as ``kind``; raise ``ConfigError`` naming each
    problem by its path below ``where`` (``isolation.uid_range.0: ...``)."""
    from pydantic import TypeAdapter, ValidationError  # see the module's docstring

    try:
        return TypeAdapter(kind).validate_python(data)
    except ValidationError as error:
        raise ConfigError(
            [".".join(map(str, (where, *e["loc"]))) + f": {e['msg']}" for e in error.errors()]
        ) from None


def encode(value: object) -> Any:
    """``value`` (one of the dataclasses above) as JSON-ready data."""
    from pydantic import TypeAdapter  # see the module's docstring

    return TypeAdapter(type(value)).dump_python(value, mode="json")


def decode(kind: type[T], data: Any) -> T:
    """Rebuild ``kind`` from what ``encode`` made of an instance ``checked``
    before: types are restored, nothing is validated again."""
    return typing.cast(T, _decode(kind, data))


def _decode(kind: Any, data: Any) -> Any:
    if dataclasses.is_dataclass(kind):
        fields = typing.get_type_hints(kind)
        values = {name: _decode(fields[name], value) for name, value in data.items()}
        return typing.cast(Any, kind)(**values)
    origin, arguments = typing.get_origin(kind), typing.get_args(kind)
    if origin is tuple and arguments[1:] == (Ellipsis,):
        return tuple(_decode(arguments[0], value) for value in data)
    if origin is tuple:
        return tuple(_decode(a, value) for a, value in zip(arguments, data, strict=True))
    if origin is list:
        return [_decode(arguments[0], value) for value in data]
    if origin in (typing.Union, types.UnionType):
        (present,) = [a for a in arguments if a is not type(None)]
        return None if data is None else _decode(present, data)
    if isinstance(kind, type) and issubclass(kind, enum.Enum | PurePath):
        return kind(data)
    return data
