"""The keeper: the small root process that starts the key server and
(re)starts the TLS helper, for as long as the proxy runs. It never reads
from the network."""
