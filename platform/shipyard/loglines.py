"""The text of a run's output, line by line: rank prefixes, ANSI escapes, Ray's job plumbing.

Shared by the driver (``shipyard run`` prints each rank's lines as ``[rank N] line``, see
:mod:`shipyard.runtime.output`), the server (which stores and serves that output, see
:mod:`shipyard.api.log_archive`) and the CLI (``shipyard logs --rank N``). Pure text functions:
no Ray, no I/O.

Every rank's line carries its prefix, rank 0's too, so that ``--rank 0`` selects exactly rank 0's
output and a line without a prefix is always the platform's own (the header, progress lines,
the summary).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterable, Iterator

# CSI sequences (colours, cursor moves, erase: ESC [ ... final byte), OSC sequences (window
# titles, hyperlinks: ESC ] ... BEL or ESC \), character-set designations (ESC ( B, as `tput sgr0`
# writes) and the two-byte escapes (ESC followed by one of @-Z \ ^ _): what a terminal interprets
# and a file or a browser shows as garbage.
ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[()*+][0-9A-Za-z]|[@-Z\\^_])")
_RANK = re.compile(r"^\[rank (\d+)\] ")

# The first line a Ray job's log holds, written by Ray's job supervisor: the shell command a
# backend ran (``export ...; printf ... && exec shipyard run ...``), not the job's output.
PLUMBING = ("Running entrypoint for job ",)
MAX_PARTIAL = 1 << 16  # a "line" this long without a newline is let through as it is


def strip_ansi(text: str) -> str:
    """``text`` without terminal escape sequences (a lone ESC that starts none is dropped too)."""
    return ANSI.sub("", text).replace("\x1b", "")


def with_rank(rank: int, line: str) -> str:
    """``[rank N] line``: how a rank's output line is shown and stored."""
    return f"[rank {rank}] {line}"


def rank_of(line: str) -> int | None:
    """The rank whose output ``line`` is (by its ``[rank N]`` prefix), None for a platform line."""
    m = _RANK.match(line)
    return int(m.group(1)) if m else None


def only_rank(text: str, rank: int) -> str:
    """The lines of ``text`` that rank ``rank`` printed (each with its prefix, as stored)."""
    return "".join(line for line in text.splitlines(keepends=True) if rank_of(line) == rank)


def last_lines(text: str, n: int | None) -> str:
    """The last ``n`` lines of ``text`` (all of it when ``n`` is None)."""
    return text if n is None else "".join(text.splitlines(keepends=True)[-n:])


def clean_line(line: str) -> str | None:
    """A stored log's line as a reader should see it: no escapes; None for Ray's plumbing."""
    line = strip_ansi(line)
    return None if line.startswith(PLUMBING) else line


def clean(text: str) -> str:
    """:func:`clean_line` over every line of ``text`` (whole lines: see :class:`LineBuffer`)."""
    return "".join(c for c in map(clean_line, text.splitlines(keepends=True)) if c is not None)


class LineBuffer:
    """Cuts a stream of chunks into whole lines, so that an escape sequence or a prefix split
    between two chunks is still seen whole. :meth:`feed` returns the complete lines so far."""

    def __init__(self) -> None:
        self._partial = ""

    def feed(self, chunk: str) -> str:
        text = self._partial + chunk
        cut = text.rfind("\n") + 1
        self._partial = text[cut:]
        if len(self._partial) > MAX_PARTIAL:
            cut = len(text)
            self._partial = ""
        return text[:cut]

    def rest(self) -> str:
        """What is left after the last newline (the stream ended mid-line)."""
        rest, self._partial = self._partial, ""
        return rest

    @property
    def pending(self) -> int:
        return len(self._partial)


def cleaned(chunks: Iterable[str], rank: int | None = None) -> Iterator[str]:
    """A stream of log chunks, cleaned line by line (and only rank ``rank``'s lines, if given)."""
    buf = LineBuffer()
    for chunk in chunks:
        if out := _select(clean(buf.feed(chunk)), rank):
            yield out
    if out := _select(clean(buf.rest()), rank):
        yield out


async def acleaned(chunks: AsyncIterator[str], rank: int | None = None) -> AsyncIterator[str]:
    """:func:`cleaned` for an asynchronous stream (the server's ``logs?follow=true``)."""
    buf = LineBuffer()
    async for chunk in chunks:
        if out := _select(clean(buf.feed(chunk)), rank):
            yield out
    if out := _select(clean(buf.rest()), rank):
        yield out


def _select(text: str, rank: int | None) -> str:
    return text if rank is None else only_rank(text, rank)
