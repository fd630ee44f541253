"""Reading user files as text: UTF-8 (BOM or not, optionally gzip-compressed), with one-line errors.

Every reader of :mod:`jaxpeft.tasks` goes through :func:`read_text`, so a missing file, an empty
file and a byte that is not UTF-8 are reported the same way everywhere: ``path:line: problem``.
"""

from __future__ import annotations

import bisect
import gzip
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jaxpeft.errors import UserError


def read_text(path: str | Path, allow_empty: bool = False) -> str:
    """The whole file decoded as UTF-8, without its byte-order mark; line ends left as they are.

    A name ending in ``.gz`` is decompressed first.

    Args:
        path: the file.
        allow_empty: return ``""`` for an empty file instead of refusing it.

    Returns:
        The text (``\\r\\n`` and ``\\r`` are kept, so callers count physical lines themselves).

    Raises:
        UserError: the file does not exist, cannot be read, holds a byte sequence that is not
            UTF-8 (naming its line and column), or is empty / only whitespace (unless
            ``allow_empty``).
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: file not found")
    try:
        raw = p.read_bytes()
        if p.name.endswith(".gz"):
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as e:
        raise UserError(f"{p}: cannot read the file ({type(e).__name__}: {e})") from None
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise UserError(f"{p}:{line}: byte 0x{raw[e.start]:02x} at column {col} is not UTF-8 "
                        f"(save the file as UTF-8)") from None
    if not allow_empty and not text.strip():
        raise UserError(f"{p}: file is empty")
    return text


def split_lines(text: str) -> list[str]:
    """Physical lines of ``text`` without their ends; ``\\n``, ``\\r\\n`` and ``\\r`` all end a line
    (and nothing else does, unlike :meth:`str.splitlines`). Line ``i`` of a file is item ``i - 1``."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def line_at(text: str, offset: int) -> int:
    """The 1-based physical line of character ``offset`` of ``text``."""
    return LineIndex(text)(offset)


class LineIndex:
    """Maps character offsets of one text to 1-based physical lines (built once, then O(log n))."""

    def __init__(self, text: str):
        self._starts = [0] + [m.end() for m in _LINE_END.finditer(text)]

    def __call__(self, offset: int) -> int:
        return bisect.bisect_right(self._starts, offset)


_LINE_END = re.compile(r"\r\n|\r|\n")
_SPACE = re.compile(r"[ \t\r\n]*")


def parse_json(text: str, path: str | Path) -> Any:
    """``json.loads`` with a decoding error turned into ``path:line: invalid JSON (...)``."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{line_at(text, e.pos)}: invalid JSON ({e.msg})") from None


def json_array_items(text: str, path: str | Path) -> Iterator[tuple[int, Any]]:
    """``(line, item)`` for each item of a top-level JSON array, the line where the item starts.

    Raises:
        UserError: the text is not one JSON array (naming the line of the problem).
    """
    dec = json.JSONDecoder()
    n = len(text)
    line_of = LineIndex(text)

    def skip(i: int) -> int:
        return _SPACE.match(text, i).end()

    i = skip(0)
    if i >= n or text[i] != "[":
        raise UserError(f"{path}:{line_of(i)}: expected a JSON array")
    i = skip(i + 1)
    if i < n and text[i] == "]":
        if skip(i + 1) != n:
            raise UserError(f"{path}:{line_of(i + 1)}: invalid JSON (extra data)")
        return
    while True:
        try:
            item, end = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{line_of(e.pos)}: invalid JSON ({e.msg})") from None
        yield line_of(i), item
        i = skip(end)
        if i < n and text[i] == ",":
            i = skip(i + 1)
            continue
        if i < n and text[i] == "]":
            if skip(i + 1) != n:
                raise UserError(f"{path}:{line_of(i + 1)}: invalid JSON (extra data)")
            return
        raise UserError(f"{path}:{line_of(i)}: invalid JSON (expected ',' or ']')")
