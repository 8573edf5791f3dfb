"""The online-softmax update shared by the prefill and decode attention kernels."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def fold_tile(s, v, m_i, l_i, acc, qk_scale, DOT_PREC: tl.constexpr):
    """Fold one tile of unscaled scores `s` [M, N] (masked entries -inf) and its values `v`
    [N, D] into the running max `m_i` [M] (log2 units), denominator `l_i` [M] and accumulator
    `acc` [M, D]; returns (m_new, l_i, acc). The scale (> 0) is applied inside exp2's argument
    so it fuses into one FMA per score. `m_i` starts at a finite -1e30 (not -inf), so a row whose
    keys in this tile are all masked gets p = 0 and alpha = 1 instead of NaN from
    (-inf) - (-inf)."""
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s * qk_scale - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return m_new, l_i, acc
