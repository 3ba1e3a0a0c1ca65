"""Protecting an intermediate tensor before it leaves its site in split inference.

Two protections, both applied to each item (the first axis) on its own, as if
every item were sent alone:

* ``quantize``: affine quantisation to ``strength`` bits (1..8) with the
  item's own scale and offset; the wire carries the packed codes plus two
  float32 numbers per item. It shrinks the payload and coarsens what an
  observer sees.
* ``noise``: additive Gaussian noise with standard deviation ``strength``
  times the item's own standard deviation (a relative signal-to-noise knob);
  the wire carries float32 as before.

``none`` passes the tensor through. ``protect`` returns what the receiving
tail computes on, as float32; ``wire_bytes`` the size it takes on the wire.
Pure numpy; the randomness comes from the caller's generator.
"""

from __future__ import annotations

import math
from enum import StrEnum

import numpy as np

from din.shared.errors import DinError, ErrorCode

FLOAT_BYTES = 4
QUANTIZE_HEADER_BYTES = 2 * FLOAT_BYTES


class Protection(StrEnum):
    """How an intermediate tensor is protected before it is sent."""

    NONE = "none"
    QUANTIZE = "quantize"
    NOISE = "noise"


def _method(method: str | Protection) -> Protection:
    try:
        return Protection(method)
    except ValueError:
        known = ", ".join(p.value for p in Protection)
        raise DinError(ErrorCode.BAD_REQUEST, f"unknown protection {method!r}; known: {known}") from None


def _check_bits(strength: float) -> int:
    bits = int(strength)
    if bits != strength or not 1 <= bits <= 8:
        raise DinError(ErrorCode.BAD_REQUEST, f"quantize strength is a bit count from 1 to 8, not {strength!r}")
    return bits


def _items(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array, dtype=np.float32)
    if array.ndim == 0:
        raise DinError(ErrorCode.BAD_REQUEST, "protect needs a tensor with a batch axis")
    return array.reshape(array.shape[0], -1)


def quantize(array: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Codes (uint8, ``0 .. 2**bits - 1``), per-item scale and per-item offset of ``array``.

    ``offset + codes * scale`` reconstructs each item to within half a step.
    An item whose values are all equal gets scale 0 and codes 0.
    """
    bits = _check_bits(bits)
    flat = _items(array)
    levels = (1 << bits) - 1
    low = flat.min(axis=1, keepdims=True)
    span = flat.max(axis=1, keepdims=True) - low
    scale = (span / levels).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0)
    codes = np.clip(np.rint((flat - low) / safe), 0, levels).astype(np.uint8)
    return codes.reshape(np.shape(array)), scale[:, 0], low[:, 0].astype(np.float32)


def dequantize(codes: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """The float32 values ``quantize``'s codes stand for."""
    flat = codes.reshape(codes.shape[0], -1).astype(np.float32)
    values = offset[:, None] + flat * scale[:, None]
    return values.astype(np.float32).reshape(codes.shape)


def protect(
    array: np.ndarray,
    method: str | Protection,
    strength: float,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """``array`` as the receiver sees it after protection ``method`` at ``strength`` (float32, same shape).

    ``quantize``: ``strength`` is the bit count (1..8). ``noise``: ``strength``
    is the noise's standard deviation relative to each item's own (0 adds
    none) and ``rng`` is required. ``none`` ignores ``strength``.
    """
    method = _method(method)
    array = np.asarray(array, dtype=np.float32)
    if method is Protection.NONE:
        return array.copy()
    if method is Protection.QUANTIZE:
        return dequantize(*quantize(array, _check_bits(strength)))
    if strength < 0 or not math.isfinite(strength):
        raise DinError(ErrorCode.BAD_REQUEST, f"noise strength must be a finite number >= 0, not {strength!r}")
    if rng is None:
        raise DinError(ErrorCode.BAD_REQUEST, "noise protection needs a random generator")
    flat = _items(array)
    sigma = strength * flat.std(axis=1, keepdims=True)
    noisy = flat + sigma * rng.standard_normal(flat.shape, dtype=np.float32)
    return noisy.astype(np.float32).reshape(array.shape)


def parse_protection(text: str) -> tuple[Protection, float]:
    """Read ``none``, ``quantize:<bits>`` or ``noise:<relative sigma>``; raise ``DinError(BAD_REQUEST)`` otherwise."""
    method, _, raw = str(text).strip().partition(":")
    protection = _method(method)
    if protection is Protection.NONE:
        if raw:
            raise DinError(ErrorCode.BAD_REQUEST, f"protection 'none' takes no strength, not {text!r}")
        return protection, 0.0
    try:
        strength = float(raw)
    except ValueError:
        raise DinError(ErrorCode.BAD_REQUEST, f"protection {text!r} needs a strength: "
                                              f"'quantize:<bits>' or 'noise:<sigma>'") from None
    if protection is Protection.QUANTIZE:
        _check_bits(strength)
    elif strength < 0 or not math.isfinite(strength):
        raise DinError(ErrorCode.BAD_REQUEST, f"noise strength must be a finite number >= 0, not {raw!r}")
    return protection, strength


def wire_bytes(elements_per_item: int, method: str | Protection, strength: float) -> int:
    """Bytes one item of ``elements_per_item`` values takes on the wire under ``method``."""
    method = _method(method)
    if method is Protection.QUANTIZE:
        return math.ceil(elements_per_item * _check_bits(strength) / 8) + QUANTIZE_HEADER_BYTES
    return elements_per_item * FLOAT_BYTES
