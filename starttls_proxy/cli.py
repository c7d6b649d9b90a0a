"""``starttls-proxy --config PATH [--check]``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import uvloop

from starttls_proxy.config import ConfigError, load_config
from starttls_proxy.handoff import TLSHelper
from starttls_proxy.server import Server


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="starttls-proxy",
        description="STARTTLS terminator for SMTP, IMAP, POP3 and XMPP.",
    )
    parser.add_argument("--config", type=Path, required=True, help="YAML configuration file")
    parser.add_argument(
        "--check",
        action="store_true",
        help="validate the configuration and certificates, then exit (0 = usable)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="stderr log level (default: info)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = load_config(args.config)
        if args.check:
            # Only here does this process read keys: --check exits right after.
            from starttls_proxy.tls_contexts import load_certificates

            load_certificates(config.tls)
            print(f"{args.config}: OK")
            return 0
        # Before the event loop exists: the helper is a fresh interpreter and
        # the only process that ever reads the private keys.
        helper = TLSHelper.start(config.tls)
    except ConfigError as error:
        for problem in error.problems:
            print(f"{args.config}: {problem}", file=sys.stderr)
        return 2
    try:
        uvloop.run(Server(config, helper).serve())
    finally:
        helper.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
