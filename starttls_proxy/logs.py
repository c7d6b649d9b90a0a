"""Logging set-up: human-readable lines, or one JSON object per line.

Session-end records carry their fields in ``record.session`` (listener,
client, outcome, TLS parameters, bytes, duration) so that the JSON format
has them as keys, not only inside the message text. Nothing here ever sees
protocol payloads: the proxy logs no commands and no credentials.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Literal

LogFormat = Literal["text", "json"]


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        session = getattr(record, "session", None)
        if isinstance(session, dict):
            entry.update(session)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure(level: str, format_: LogFormat) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if format_ == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])
