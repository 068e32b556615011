"""What Linux says of this process's memory, for tests of mapped checkpoints."""

from __future__ import annotations


def mappings_of(folder) -> list[tuple[int, int]]:
    """Address ranges of this process's mappings of files under `folder` (/proc/self/maps)."""
    spans = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[5].startswith(str(folder)):
                begin, end = (int(value, 16) for value in fields[0].split("-"))
                spans.append((begin, end))
    return spans
