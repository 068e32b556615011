"""Whether this process may ask Linux for transparent huge pages, and asking for them over a
mapping. The model's loader asks for a mapped checkpoint's pages (loader._map_safetensors), the
engine for its KV cache and packed weights (engine/host_memory.py); both follow one switch."""

from __future__ import annotations

import mmap
import os
import sys

HUGE_PAGES_VARIABLE = "STARCHAT_HUGE_PAGES"
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def switched_off(variable: str) -> bool:
    """An environment switch set to 0 / false / no / off (unset: on)."""
    return os.environ.get(variable, "1").strip().lower() in ("0", "false", "no", "off")


def huge_pages_allowed() -> bool:
    """Transparent huge pages exist here (Linux) and are not set to "never" (the administrator's
    choice stands), and STARCHAT_HUGE_PAGES is not 0."""
    if switched_off(HUGE_PAGES_VARIABLE):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        with open(THP_SETTING) as setting:
            return "[never]" not in setting.read()
    except OSError:
        return False


def advise_huge_pages(mapping: mmap.mmap, offset: int = 0, length: int | None = None) -> bool:
    """Ask for 2 MiB pages over a mapping's bytes before they are touched (MADV_HUGEPAGE: nothing
    is copied), where huge pages are allowed. For a file's mapping the page cache then reads it in
    2 MiB folios, mapped as huge pages, on filesystems with large folios. False where nothing was
    asked (not allowed, or no MADV_HUGEPAGE)."""
    if not huge_pages_allowed():
        return False
    try:
        mapping.madvise(mmap.MADV_HUGEPAGE, offset, len(mapping) - offset if length is None else length)
    except (AttributeError, OSError):  # no MADV_HUGEPAGE here: 4 KiB pages
        return False
    return True
