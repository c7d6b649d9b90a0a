"""The sandbox layers (``layers``), the seccomp allow-lists (``seccomp``)
and the privilege drop every process of the proxy uses. The workers'
own sandbox is C (``tls/helper/sandbox.c``); this is the Python side."""
