"""A minimal ``auth_http`` server for nginx mail: every login goes to one local backend.

nginx's mail proxy has no ``proxy_pass``: it asks an HTTP server where each session
goes (after RCPT TO for SMTP with ``smtp_auth none``, after LOGIN for IMAP and POP3).
This one answers ``Auth-Status: OK`` with the backend of the request's
``Auth-Protocol`` and never checks the password (the backend does).

``python -m bench.auth_http --listen 127.0.0.1:PORT --backend smtp=127.0.0.1:PORT ...``
"""

from __future__ import annotations

import argparse
import asyncio

import uvloop

#: Longest request head accepted (nginx sends a few hundred bytes).
MAX_HEAD = 16 * 1024
READ_TIMEOUT = 30.0


def parse_head(head: bytes) -> dict[str, str]:
    """Header fields of an HTTP request head, names lower-cased."""
    fields: dict[str, str] = {}
    for line in head.split(b"\r\n")[1:]:
        name, colon, value = line.partition(b":")
        if colon:
            fields[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    return fields


def answer(fields: dict[str, str], backends: dict[str, tuple[str, int]]) -> bytes:
    """The response to an auth request: the backend of its protocol, or a temporary error."""
    backend = backends.get(fields.get("auth-protocol", ""))
    if backend is None:
        lines = ["Auth-Status: no backend for this protocol", "Auth-Wait: 1"]
    else:
        host, port = backend
        lines = ["Auth-Status: OK", f"Auth-Server: {host}", f"Auth-Port: {port}"]
    return ("HTTP/1.0 200 OK\r\n" + "".join(f"{line}\r\n" for line in lines) + "\r\n").encode()


async def _serve(listen: tuple[str, int], backends: dict[str, tuple[str, int]]) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
            writer.write(answer(parse_head(head), backends))
            await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, *listen, limit=MAX_HEAD, backlog=1024)
    async with server:
        await server.serve_forever()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.auth_http")
    parser.add_argument("--listen", type=_address, required=True)
    parser.add_argument(
        "--backend", action="append", default=[], help="PROTOCOL=HOST:PORT (repeatable)"
    )
    args = parser.parse_args()
    backends: dict[str, tuple[str, int]] = {}
    for entry in args.backend:
        protocol, _, address = entry.partition("=")
        backends[protocol] = _address(address)
    uvloop.run(_serve(args.listen, backends))


if __name__ == "__main__":
    main()
