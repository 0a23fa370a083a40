"""The bit-widths every floor agrees on: the range, the (w_bits, a_bits) pair, and their checks.

Dependency-free, so that the quantizers (torch) and the plans (NumPy/SciPy) share one definition.
"""

from __future__ import annotations

import numbers
from typing import Any

MIN_BITS, MAX_BITS = 2, 8
Bits = tuple[int, int]  # (w_bits, a_bits) of one site


def check_bits(bits: Any) -> int:
    """``bits`` as an int if it is an integer in 2..8 (NumPy integers too), else a ``ValueError``."""
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or not MIN_BITS <= int(bits) <= MAX_BITS:
        raise ValueError(f'bit-width must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r}')
    return int(bits)


def check_bit_pair(entry: str, value: Any) -> Bits:
    """``value`` as a ``(w_bits, a_bits)`` pair of ints in 2..8, or a ValueError naming ``entry``."""
    if isinstance(value, (str, bytes)) or not hasattr(value, '__len__') or len(value) != 2:
        raise ValueError(f'bit plan entry {entry!r}: expected [w_bits, a_bits], got {value!r}')
    out = []
    for what, b in zip(('w_bits', 'a_bits'), value):
        if isinstance(b, bool) or not isinstance(b, numbers.Integral) or not MIN_BITS <= int(b) <= MAX_BITS:
            raise ValueError(
                f'bit plan entry {entry!r}: {what} must be an integer in {MIN_BITS}..{MAX_BITS}, got {b!r}'
            )
        out.append(int(b))
    return out[0], out[1]
