"""Wording shared by messages and log lines."""

from __future__ import annotations


def counted(count: int, noun: str, plural: str = "") -> str:
    """`count` and `noun`, the noun plural unless the count is one: "1 request", "3 requests".

    `plural` is for nouns that do not just add an "s" ("1 entry", "2 entries").
    """
    return f"{count} {noun if count == 1 else plural or noun + 's'}"
