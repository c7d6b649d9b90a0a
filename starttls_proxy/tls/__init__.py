"""The TLS side: the C helper and its single-use workers (``helper/``), and
the Python that prepares what they serve: the policy's description
(``description``, built by the keeper) and the same policy rendered with
pyOpenSSL (``contexts``, for ``--check`` and the agreement tests)."""
