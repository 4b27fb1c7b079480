"""Parse and format byte sizes the way users write them on the command line.

Units follow IEC 80000-13, the convention of `hf` and ollama users:

- decimal: KB, MB, GB, TB are powers of 1000 (2GB = 2,000,000,000 bytes)
- binary: KiB, MiB, GiB, TiB are powers of 1024 (2GiB = 2,147,483,648 bytes)
- a bare letter K, M, G, T is binary (2G = 2GiB), as in `free -g`, `docker --memory 2g`
  and systemd's MemoryMax=2G
- a plain number, or one ending in B, is bytes

Letters are case-insensitive ("2gb" is 2GB). A fraction is allowed ("2.5GB").
"""

from __future__ import annotations

import math
import re

KB = 1000
MB = 1000**2
GB = 1000**3
TB = 1000**4
KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30
TIB = 1 << 40

_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "kb": KB,
    "mb": MB,
    "gb": GB,
    "tb": TB,
    "k": KIB,
    "m": MIB,
    "g": GIB,
    "t": TIB,
    "kib": KIB,
    "mib": MIB,
    "gib": GIB,
    "tib": TIB,
}

_SIZE_RE = re.compile(r"^\s*(?P<number>[+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*(?P<unit>[a-z]*)\s*$", re.IGNORECASE)

SIZE_FORMS = "2GB (10^9 bytes), 2GiB or 2G (2^30 bytes), 1500MB, 512MiB, 2.5GB, or plain bytes"


def parse_size(text: str) -> int:
    """Parse a size such as "2GB", "512MiB" or "2.5G" into a whole number of bytes.

    Raises ValueError naming the accepted forms when the text is malformed, and when
    the size is negative. Zero is returned as 0; callers that need a positive size
    check that themselves. A fraction of a byte rounds down.
    """
    match = _SIZE_RE.match(text)
    if match is None:
        raise ValueError(f"invalid size '{text}': expected a number and a unit, such as {SIZE_FORMS}")

    unit = match["unit"].lower()
    if unit not in _UNITS:
        raise ValueError(f"invalid size '{text}': unknown unit '{match['unit']}'; use {SIZE_FORMS}")

    number = float(match["number"])
    if number < 0:
        raise ValueError(f"invalid size '{text}': a size cannot be negative")
    value = number * _UNITS[unit]
    if not math.isfinite(value):
        raise ValueError(f"invalid size '{text}': too large")
    return int(value)


def format_size(size: int | float) -> str:
    """Format bytes for people: MiB below 1 GiB, GiB above, with the binary unit named."""
    if size < 0:
        return "-" + format_size(-size)
    if size < MIB:
        return f"{size / KIB:.1f} KiB"
    if size < GIB:
        return f"{size / MIB:.0f} MiB"
    return f"{size / GIB:.2f} GiB"


def to_mib(size: int | float) -> float:
    """Return a byte count in MiB, rounded to 0.1 for JSON output."""
    return round(size / MIB, 1)
