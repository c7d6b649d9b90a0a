"""Find private key material in a live process's memory (``/proc/PID/mem``, as root)."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa


def _both_orders(name: str, number: int, size: int) -> dict[str, bytes]:
    # OpenSSL keeps big numbers as little-endian words: look for both orders.
    return {name: number.to_bytes(size, "big"), f"{name}-le": number.to_bytes(size, "little")}


def private_key_patterns(key_path: Path) -> dict[str, bytes]:
    """The key as PEM text and its private numbers: the EC scalar, or RSA's
    d, p and q."""
    pem = key_path.read_bytes()
    key = serialization.load_pem_private_key(pem, password=None)
    body = b"".join(pem.splitlines()[1:-1])
    patterns = {"pem": body[:48]}
    if isinstance(key, ec.EllipticCurvePrivateKey):
        size = (key.curve.key_size + 7) // 8
        patterns |= _both_orders("scalar", key.private_numbers().private_value, size)
    else:
        assert isinstance(key, rsa.RSAPrivateKey)
        numbers = key.private_numbers()
        patterns |= _both_orders("d", numbers.d, key.key_size // 8)
        patterns |= _both_orders("p", numbers.p, key.key_size // 16)
        patterns |= _both_orders("q", numbers.q, key.key_size // 16)
    return patterns


def memory_contains(pid: int, patterns: dict[str, bytes]) -> set[str]:
    """Which patterns occur in the readable memory of ``pid``."""
    found = set()
    with Path(f"/proc/{pid}/maps").open() as maps, Path(f"/proc/{pid}/mem").open("rb") as mem:
        for line in maps:
            addresses, permissions = line.split()[:2]
            if not permissions.startswith("r"):
                continue
            start, end = (int(a, 16) for a in addresses.split("-"))
            try:
                mem.seek(start)
                region = mem.read(end - start)
            except (OSError, OverflowError):
                continue  # [vvar] and the like
            found |= {name for name, pattern in patterns.items() if pattern in region}
    return found
