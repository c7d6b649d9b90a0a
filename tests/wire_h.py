"""What the C headers of a wire format define, read from the headers
themselves, so that tests can hold the Python side in agreement with the C
one: ``tls/helper/wire.h`` (the TLS helper's, every function's default),
``keys/keyserver_wire.h`` (the key server's) and ``provider/keyref.h``
(the key reference's)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent.parent / "starttls_proxy"
WIRE_H = _PACKAGE / "tls" / "helper" / "wire.h"
KEYSERVER_WIRE_H = _PACKAGE / "keys" / "keyserver_wire.h"
KEYREF_H = _PACKAGE / "keys" / "provider" / "keyref.h"

_DEFINE = re.compile(r"^#define[ \t]+([A-Z_][A-Z0-9_]*)[ \t]+(.+?)[ \t]*(?:/\*.*)?$", re.MULTILINE)
_STRING = re.compile(r'^#define[ \t]+([A-Z_][A-Z0-9_]*)[ \t]+"([^"\\]*)"', re.MULTILINE)
_ENUM = re.compile(r"enum\s+(\w+)\s*\{(.*?)\};", re.DOTALL)
_COMMENT = re.compile(r"/\*.*?\*/", re.DOTALL)


def _evaluate(node: ast.expr, known: dict[str, int]) -> int:
    """An integer expression of a header: literals, earlier names, + - * and parentheses."""
    match node:
        case ast.Constant(value=int() as value):
            return value
        case ast.Name(id=name):
            return known[name]
        case ast.BinOp(left=left, op=ast.Add(), right=right):
            return _evaluate(left, known) + _evaluate(right, known)
        case ast.BinOp(left=left, op=ast.Sub(), right=right):
            return _evaluate(left, known) - _evaluate(right, known)
        case ast.BinOp(left=left, op=ast.Mult(), right=right):
            return _evaluate(left, known) * _evaluate(right, known)
    raise ValueError(f"not an integer expression of a wire header: {ast.dump(node)}")


def defines(header: Path = WIRE_H) -> dict[str, int]:
    """Every integer ``#define``, evaluated (the include guard and string
    literals left out)."""
    known: dict[str, int] = {}
    for name, expression in _DEFINE.findall(header.read_text()):
        value = ast.parse(expression, mode="eval").body
        if not isinstance(value, ast.Constant) or not isinstance(value.value, str):
            known[name] = _evaluate(value, known)
    return known


def strings(header: Path) -> dict[str, str]:
    """Every ``#define`` of a string literal without escapes. ``header`` may
    be a C source file: its other ``#define``s are left out."""
    return dict(_STRING.findall(header.read_text()))


def enum(name: str, header: Path = WIRE_H) -> dict[str, int]:
    """The members of ``enum NAME`` and their values (C's implicit numbering)."""
    for found, body in _ENUM.findall(header.read_text()):
        if found != name:
            continue
        members: dict[str, int] = {}
        following = 0
        for entry in _COMMENT.sub("", body).split(","):
            member, _, value = (part.strip() for part in entry.partition("="))
            if not member:
                continue
            following = int(value, 0) if value else following
            members[member] = following
            following += 1
        return members
    raise KeyError(name)
