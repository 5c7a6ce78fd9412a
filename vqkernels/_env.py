"""Yes/no settings read from the environment (VQK_DETERMINISTIC, VQK_HUGEPAGES, VQK_TRITON_OP), all
parsed one way, so that a typo is an error naming the variable instead of a silent on or off."""
from __future__ import annotations

import os

_ON = ("1", "on", "true", "yes")
_OFF = ("0", "off", "false", "no")


def flag(name: str, default: bool) -> bool:
    """The setting `name`: unset or empty gives `default`; 1/on/true/yes and 0/off/false/no (any
    case, surrounding spaces ignored) turn it on and off; anything else raises ValueError."""
    raw = os.environ.get(name, "")
    v = raw.strip().lower()
    if not v:
        return default
    if v in _ON:
        return True
    if v in _OFF:
        return False
    raise ValueError(f"{name} must be one of {'/'.join(_ON)} or {'/'.join(_OFF)}, got {raw!r}")
