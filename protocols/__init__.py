"""Sans-I/O protocol machines, one module per protocol (no socket or asyncio imports).

``registry.PROTOCOLS`` names the machine for each listener ``protocol``.
"""
