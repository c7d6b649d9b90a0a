"""Helpers that start real servers (Postfix, later Dovecot and Prosody) for the tests."""
