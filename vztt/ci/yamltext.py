"""YAML text for the CI files: block style, keys in the order given, a comment
header, strings quoted only when YAML would read them otherwise.

The CI files are read by people as much as by CI systems, and diffed when the
description changes: a small writer of our own keeps them as a person would
write them (PyYAML cannot keep comments or choose per-list flow style).
Values: dict, list, Flow (a list written `[a, b]`), str, int, bool, None.
"""

from __future__ import annotations

import json
import re
from typing import Any


class Flow(list):  # type: ignore[type-arg]
    """A short list written on one line: `[a, b, c]`."""


_RESERVED = {"true", "false", "yes", "no", "on", "off", "null", "y", "n", "~", ""}
_INDICATORS = set("-?:,[]{}#&*!|>'\"%@`")       # may not start a plain scalar


def _plain_ok(text: str) -> bool:
    """YAML (1.1 and 1.2, block context) reads `text` unquoted as this very string."""
    return (text.strip() == text and text.lower() not in _RESERVED and text[0] not in _INDICATORS
            and ": " not in text and " #" not in text and not text.endswith(":") and "\t" not in text
            and not re.fullmatch(r"[0-9.+_:eE-]+|0x[0-9a-fA-F]+|\.(inf|nan)", text, re.I))


def scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    text = str(value)
    if text and _plain_ok(text):
        return text
    return json.dumps(text)            # a JSON string is a YAML double-quoted scalar


def _key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_.-]+", key) and key.lower() not in _RESERVED else json.dumps(key)


def _lines(value: Any, indent: int) -> list[str]:
    pad = " " * indent
    out: list[str] = []
    if isinstance(value, dict):
        for k, v in value.items():
            if isinstance(v, Flow):
                out.append(f"{pad}{_key(k)}: [{', '.join(scalar(x) for x in v)}]")
            elif isinstance(v, (dict, list)) and v:
                out.append(f"{pad}{_key(k)}:")
                out += _lines(v, indent + 2)
            elif isinstance(v, str) and "\n" in v:
                out.append(f"{pad}{_key(k)}: |")
                out += [f"{pad}  {line}".rstrip() for line in v.rstrip("\n").split("\n")]
            else:
                out.append(f"{pad}{_key(k)}: {scalar(v) if not isinstance(v, (dict, list)) else '{}' if isinstance(v, dict) else '[]'}")
        return out
    for item in value:
        if isinstance(item, dict) and item:
            inner = _lines(item, indent + 2)
            out.append(f"{pad}- {inner[0].lstrip()}")
            out += inner[1:]
        elif isinstance(item, str) and "\n" in item:
            out.append(f"{pad}- |")
            out += [f"{pad}  {line}".rstrip() for line in item.rstrip("\n").split("\n")]
        else:
            out.append(f"{pad}- {scalar(item)}")
    return out


def dump(doc: dict[str, Any], header: str = "", spaced: tuple[str, ...] = ()) -> str:
    """The document as YAML text: `header` as comment lines first, a blank line before each
    top-level key that spans lines, and between the entries of the top-level keys in `spaced`."""
    out = [f"# {line}".rstrip() for line in header.strip("\n").split("\n")] if header else []
    for k, v in doc.items():
        lines = _lines({k: v}, 0)
        if out and (len(lines) > 1 or k in spaced):
            out.append("")
        if k in spaced and isinstance(v, dict):
            out.append(f"{_key(k)}:")
            for i, (ck, cv) in enumerate(v.items()):
                out += ([""] if i else []) + _lines({ck: cv}, 2)
            continue
        out += lines
    return "\n".join(out) + "\n"
