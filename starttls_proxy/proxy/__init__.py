"""The main process: unprivileged, network-facing, one asyncio event loop.

It accepts clients, runs the protocol machines, hands each upgrade to the
TLS helper and relays plaintext. It never holds a private key and does no
TLS, so it imports nothing from ``tls``, ``sandbox``, ``keys`` or
``privileged`` (``tests/test_layout.py`` holds that).
"""
