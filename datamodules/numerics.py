"""Transcendental functions whose float32 results are the same on every CPU.

numpy picks its float32 ``sin``/``cos``/``exp``/``arctan2`` kernels by the CPU's SIMD instruction
set (AVX2, AVX-512, ...), and those kernels differ in the last bit. Through the embedded renderer
that moved single pixels of 56 of 369 images between an AVX2 and an AVX-512 machine
(results/reproducibility.md). Evaluated in float64 and rounded to float32, the results agree: a
float64 last-bit difference survives the rounding only when it straddles a float32 rounding
boundary, about once in 2**29 values.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["arctan2", "cos", "exp", "hypot", "sin"]


def _via_float64(ufunc: np.ufunc) -> Callable[..., np.ndarray]:
    def evaluate(*operands: np.ndarray | float) -> np.ndarray:
        dtype = np.result_type(*operands)  # float32 in, float32 out (python floats do not widen)
        return ufunc(*(np.asarray(operand, np.float64) for operand in operands)).astype(dtype)

    evaluate.__name__ = evaluate.__qualname__ = ufunc.__name__
    evaluate.__doc__ = f"``np.{ufunc.__name__}`` evaluated in float64, returned in the operands' dtype."
    return evaluate


sin = _via_float64(np.sin)
cos = _via_float64(np.cos)
exp = _via_float64(np.exp)
arctan2 = _via_float64(np.arctan2)
hypot = _via_float64(np.hypot)
