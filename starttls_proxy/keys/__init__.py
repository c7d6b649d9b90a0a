"""Private keys: the key server (``server``, its request loop ``service/``
in C), the key-reference provider that TLS workers load instead of a key
(``provider/``), and their shared wire format (``keyserver_wire.h``)."""
