"""What ``starttls_proxy/tlshelper/wire.h`` defines, read from the header
itself, so that tests can hold the Python side in agreement with the C one."""

from __future__ import annotations

import ast
import re
from pathlib import Path

WIRE_H = Path(__file__).resolve().parent.parent / "starttls_proxy" / "tlshelper" / "wire.h"

_DEFINE = re.compile(r"^#define[ \t]+([A-Z_][A-Z0-9_]*)[ \t]+(.+?)[ \t]*(?:/\*.*)?$", re.MULTILINE)
_ENUM = re.compile(r"enum\s+(\w+)\s*\{(.*?)\};", re.DOTALL)
_COMMENT = re.compile(r"/\*.*?\*/", re.DOTALL)


def _evaluate(node: ast.expr, known: dict[str, int]) -> int:
    """An integer expression of the header: literals, earlier names, + - * and parentheses."""
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
    raise ValueError(f"not an expression of wire.h: {ast.dump(node)}")


def defines() -> dict[str, int]:
    """Every integer ``#define``, evaluated (the include guard left out)."""
    known: dict[str, int] = {}
    for name, expression in _DEFINE.findall(WIRE_H.read_text()):
        known[name] = _evaluate(ast.parse(expression, mode="eval").body, known)
    return known


def enum(name: str) -> dict[str, int]:
    """The members of ``enum NAME`` and their values (C's implicit numbering)."""
    for found, body in _ENUM.findall(WIRE_H.read_text()):
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
