"""Triton helpers shared by the forward and backward kernels.

Exponent units: without a bias, scores are kept in log2 units (``log2(e)`` is folded into the softmax
scale, so ``exp`` becomes a bare ``exp2``). With a bias they stay in natural units until after the row
maximum is subtracted, because a ``torch.finfo(float32).min`` bias times ``log2(e)`` would overflow to
``-inf`` and turn eager's "uniform average" rows into NaN rows.
"""

import triton
import triton.language as tl

LOG2E: tl.constexpr = 1.4426950408889634
LN2: tl.constexpr = 0.6931471805599453


@triton.jit
def dot(a, b, UPCAST_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """``a @ b`` accumulated in float32 (operands upcast first when the interpreter needs it)."""
    if UPCAST_DOT:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=INPUT_PRECISION)
    else:
        out = tl.dot(a, b, input_precision=INPUT_PRECISION)
    return out


@triton.jit
def load_rows(base, rows, offs_d, stride_row, stride_d, n_rows, HEAD_DIM: tl.constexpr, CHECK_ROWS: tl.constexpr):
    """Load a [rows, BLOCK_D] tile; padded head-dim columns (and, if checked, rows >= n_rows) read 0."""
    ptrs = base + rows[:, None] * stride_row + offs_d[None, :] * stride_d
    mask = offs_d[None, :] < HEAD_DIM
    if CHECK_ROWS:
        mask = mask & (rows[:, None] < n_rows)
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def store_rows(base, tile, rows, offs_d, stride_row, stride_d, n_rows, HEAD_DIM: tl.constexpr):
    """Store a [rows, BLOCK_D] tile, skipping rows >= n_rows and padded head-dim columns."""
    ptrs = base + rows[:, None] * stride_row + offs_d[None, :] * stride_d
    tl.store(ptrs, tile.to(base.dtype.element_ty), mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def scores(qk, bias_base, rows, cols, stride_bias_row, stride_bias_col, n_rows, n_cols, sm_scale,
           HAS_BIAS: tl.constexpr):
    """Scaled (and biased) scores of a tile in exponent units; ``rows`` index q, ``cols`` index k.

    ``rows``/``cols`` may be given as a column and a row vector or the other way around, so the same
    helper serves the transposed tiles of the dK/dV kernel. Out-of-range bias entries read 0.
    """
    if HAS_BIAS:
        ptrs = bias_base + rows * stride_bias_row + cols * stride_bias_col
        bias = tl.load(ptrs, mask=(rows < n_rows) & (cols < n_cols), other=0.0)
        s = qk * sm_scale + bias.to(tl.float32)
    else:
        s = qk * (sm_scale * LOG2E)
    return s


@triton.jit
def exp_units(x, HAS_BIAS: tl.constexpr):
    """``exp`` of a difference of scores expressed in exponent units."""
    if HAS_BIAS:
        out = tl.exp2(x * LOG2E)
    else:
        out = tl.exp2(x)
    return out


@triton.jit
def lse_to_units(lse, HAS_BIAS: tl.constexpr):
    """Convert a saved natural-log LSE to exponent units; fully masked rows (-inf) become +inf.

    With +inf every probability of a fully masked row is exactly 0, so such rows contribute no
    gradient instead of spreading NaN (exp(-inf - -inf)) into dK and dV.
    """
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    if not HAS_BIAS:
        lse = lse * LOG2E
    return lse


@triton.jit
def visible(rows, cols, n_cols, causal_offset, IS_CAUSAL: tl.constexpr):
    """Mask of the (query ``rows``, key ``cols``) pairs that may attend: in range and, if causal, j <= i + c."""
    ok = cols < n_cols
    if IS_CAUSAL:
        ok = ok & (cols <= rows + causal_offset)
    return ok


@triton.jit
def key_stages(start_m, n_k, causal_offset, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               IS_CAUSAL: tl.constexpr):
    """Key ranges for the query tile at ``start_m``: ``[0, a)`` needs no mask, ``[a, b)`` does.

    Key tiles past ``b`` are invisible to the whole query tile (causal) and skipped. The masked range
    holds the diagonal tiles and the ragged last tile.
    """
    full_end = (n_k // BLOCK_N) * BLOCK_N
    if IS_CAUSAL:
        end = tl.minimum(n_k, tl.maximum(start_m + BLOCK_M + causal_offset, 0))
        below_diagonal = tl.maximum(start_m + causal_offset + 1, 0) // BLOCK_N * BLOCK_N
        unmasked_end = tl.minimum(full_end, below_diagonal)
    else:
        end = n_k
        unmasked_end = full_end
    return unmasked_end, end


@triton.jit
def query_stages(start_n, n_q, causal_offset, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 IS_CAUSAL: tl.constexpr):
    """Query ranges for the key tile at ``start_n``: ``[a, b)`` needs the causal mask, ``[b, n_q)`` not.

    Query tiles before ``a`` see none of the tile's keys (causal) and are skipped. Ragged query rows
    need no mask: they read as zeros and contribute nothing.
    """
    if IS_CAUSAL:
        start = tl.maximum(start_n - causal_offset, 0) // BLOCK_M * BLOCK_M
        sees_whole_tile = tl.maximum(start_n + BLOCK_N - 1 - causal_offset, 0)
        masked_end = tl.minimum((sees_whole_tile + BLOCK_M - 1) // BLOCK_M * BLOCK_M, n_q)
    else:
        start = 0
        masked_end = 0
    return start, masked_end


@triton.jit
def kv_head(h, num_kv_heads, group_size, KV_TILED: tl.constexpr):
    """The KV head query head ``h`` reads: ``h % Hkv`` if the KV heads are tiled, else ``h // group``."""
    if KV_TILED:
        out = h % num_kv_heads
    else:
        out = h // group_size
    return out


@triton.jit
def query_head(h_kv, r, num_kv_heads, group_size, KV_TILED: tl.constexpr):
    """The ``r``-th (``r < group``) query head reading KV head ``h_kv``; inverse of :func:`kv_head`."""
    if KV_TILED:
        out = h_kv + r * num_kv_heads
    else:
        out = h_kv * group_size + r
    return out
