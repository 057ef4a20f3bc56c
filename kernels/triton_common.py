"""Triton helpers shared by the forward and backward kernels.

Exponent units: without a bias, scores are kept in log2 units (``log2(e)`` is folded into the softmax
scale, so ``exp`` becomes a bare ``exp2``). With a bias they stay in natural units until after the row
maximum is subtracted, because a ``torch.finfo(float32).min`` bias times ``log2(e)`` would overflow to
``-inf`` and turn eager's "uniform average" rows into NaN rows.
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
MAX_MOD_STEPS = tl.constexpr(6)  # spec.MAX_MOD_STEPS
LN2 = tl.constexpr(0.6931471805599453)


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
def tanh(x):
    """float32 tanh to a few units in the last place: an odd series below |x| = 0.2 (where (1 - e) / (1 + e)
    would cancel), ``(1 - e) / (1 + e)`` with ``e = exp(-2|x|)`` above; NaN stays NaN, +-inf gives +-1."""
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    far = (1.0 - e) / (1.0 + e)
    far = tl.where(x < 0, -far, far)
    x2 = x * x
    near = x * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * (-0.05396825396825397
                                                                                      + x2 * 0.021869488536155203))))
    return tl.where(ax < 0.2, near, far)


@triton.jit
def mod_step(x, d, a, b, factor, OP: tl.constexpr):
    """One step of a score modification (opcodes: :data:`spec.MOD_OPS`) on ``x`` and on ``d``, the derivative of
    ``x`` in the scaled score (PyTorch's backward formulas: relu passes where x > 0, clamp where a <= x <= b)."""
    if OP == 1:  # mul
        y = x * a
        d = d * a
    elif OP == 2:  # add
        y = x + a
    elif OP == 3:  # tanh
        y = tanh(x)
        d = d * (1.0 - y * y)
    elif OP == 4:  # sigmoid
        y = 1.0 / (1.0 + tl.exp(-x))
        d = d * (y * (1.0 - y))
    elif OP == 5:  # relu (NaN stays NaN)
        y = tl.where(x <= 0.0, 0.0, x)
        d = tl.where(x > 0.0, d, 0.0)
    elif OP == 6:  # clamp (NaN stays NaN)
        y = tl.where(x != x, x, tl.minimum(tl.maximum(x, a), b))
        d = tl.where((x >= a) & (x <= b), d, 0.0)
    elif OP == 7:  # square
        y = x * x
        d = d * (2.0 * x)
    else:  # mul_head
        y = x * factor
        d = d * factor
    return y, d


@triton.jit
def score_mod(x, mod_params, factor, MOD: tl.constexpr):
    """``(mod(x), mod'(x))`` of the score modification whose opcodes ``MOD`` packs four bits per step (first step
    lowest; :func:`triton_launch.mod`), with step i's constants at ``mod_params[2i], mod_params[2i + 1]`` and
    ``factor`` the program's head factor."""
    d = tl.full(x.shape, 1.0, tl.float32)
    for i in tl.static_range(MAX_MOD_STEPS):
        if (MOD >> (4 * i)) & 15 != 0:
            a = tl.load(mod_params + 2 * i)
            b = tl.load(mod_params + 2 * i + 1)
            x, d = mod_step(x, d, a, b, factor, (MOD >> (4 * i)) & 15)
    return x, d


@triton.jit
def head_factor(factors, b, h, stride_b, stride_h, MOD: tl.constexpr):
    """The float32 head factor of a score modification for batch row ``b`` and query head ``h`` (0.0, nothing
    read, without a modification)."""
    if MOD != 0:
        out = tl.load(factors + b * stride_b + h * stride_h).to(tl.float32)
    else:
        out = 0.0
    return out


@triton.jit
def scores(qk, bias_base, rows, cols, stride_bias_row, stride_bias_col, n_rows, n_cols, sm_scale, slope, rel_base,
           stride_rel, mod_params, factor, HAS_BIAS: tl.constexpr, LOAD_BIAS: tl.constexpr, HAS_ALIBI: tl.constexpr,
           ALIBI_SYMMETRIC: tl.constexpr, HAS_REL: tl.constexpr, MOD: tl.constexpr):
    """Scaled (modified, biased) scores of a tile in exponent units, and the score modification's derivative
    (1.0 without one); ``rows`` index q, ``cols`` index k.

    With ``MOD`` (see :func:`score_mod`) the modification applies to ``qk * sm_scale`` before every other term.

    ``rows``/``cols`` may be given as a column and a row vector or the other way around, so the same
    helper serves the transposed tiles of the dK/dV kernel. Out-of-range bias entries read 0. With a bias
    but ``LOAD_BIAS`` false, the tile's bias is known to be 0 (a full tile of a block-sparse layout): it is
    not read, and the scores keep the natural units of biased scores, like the rest of the row.

    With ``HAS_ALIBI`` the ALiBi term ``slope * (col - row)`` (``slope * -|col - row|`` if
    ``ALIBI_SYMMETRIC``; natural units, converted with the rest) is added; like the bias it is 0 out of
    range, so padded rows and columns never see a huge term.

    With ``HAS_REL`` the relative-position term ``rel_base[(col - row + n_rows - 1) * stride_rel]`` (natural
    units, any float dtype read as float32; see :func:`relative_terms`) is added too, 0 out of range as well.
    """
    if MOD != 0:
        base, derivative = score_mod(qk * sm_scale, mod_params, factor, MOD)
    else:
        base = qk * sm_scale
        derivative = 1.0
    if HAS_BIAS:
        if LOAD_BIAS:
            ptrs = bias_base + rows * stride_bias_row + cols * stride_bias_col
            bias = tl.load(ptrs, mask=(rows < n_rows) & (cols < n_cols), other=0.0)
            s = base + bias.to(tl.float32)
        else:
            s = base
        if HAS_ALIBI:
            s = s + slope * alibi_positions(rows, cols, n_rows, n_cols, ALIBI_SYMMETRIC)
        if HAS_REL:
            s = s + relative_terms(rel_base, rows, cols, stride_rel, n_rows, n_cols)
    else:
        if MOD != 0:
            s = base * LOG2E
        else:
            s = qk * (sm_scale * LOG2E)
        if HAS_ALIBI:
            s = s + (slope * LOG2E) * alibi_positions(rows, cols, n_rows, n_cols, ALIBI_SYMMETRIC)
        if HAS_REL:
            s = s + relative_terms(rel_base, rows, cols, stride_rel, n_rows, n_cols) * LOG2E
    return s, derivative


@triton.jit
def relative_terms(rel_base, rows, cols, stride_rel, n_rows, n_cols):
    """float32 ``rel_base[(col - row + n_rows - 1) * stride_rel]`` of the (``rows``, ``cols``) pairs: a vector
    over the ``n_rows + n_cols - 1`` relative positions, gathered; 0 (nothing read) where a row or column is out
    of range. Either of ``rows``/``cols`` may be the row vector (see :func:`scores`)."""
    ok = (rows < n_rows) & (cols < n_cols)
    return tl.load(rel_base + (cols - rows + n_rows - 1) * stride_rel, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def add_relative_grad(drel_base, ds, rows, cols, stride_drel, n_rows, n_cols):
    """``drel_base[(col - row + n_rows - 1) * stride_drel] += ds`` for the in-range (``rows``, ``cols``) pairs of a
    tile, with float32 atomics (many pairs of a tile share a relative position, and programs of other query tiles
    add to the same entries, so the summation order, hence the rounding, is not deterministic)."""
    ok = (rows < n_rows) & (cols < n_cols)
    tl.atomic_add(drel_base + (cols - rows + n_rows - 1) * stride_drel, ds, mask=ok, sem="relaxed")


@triton.jit
def alibi_positions(rows, cols, n_rows, n_cols, SYMMETRIC: tl.constexpr):
    """float32 ``col - row`` (``-|col - row|`` if ``SYMMETRIC``) of the (``rows``, ``cols``) pairs, 0 where a
    row or column is out of range; either may be the row vector (see :func:`scores`)."""
    pos = cols - rows
    if SYMMETRIC:
        pos = -tl.abs(pos)
    pos = tl.where((rows < n_rows) & (cols < n_cols), pos, 0)
    return pos.to(tl.float32)


@triton.jit
def alibi_slope(slopes, b, h, stride_b, stride_h, HAS_ALIBI: tl.constexpr):
    """The float32 ALiBi slope of batch row ``b`` and query head ``h`` (0.0, nothing read, without ALiBi)."""
    if HAS_ALIBI:
        out = tl.load(slopes + b * stride_b + h * stride_h).to(tl.float32)
    else:
        out = 0.0
    return out


@triton.jit
def exp_units(x, HAS_BIAS: tl.constexpr):
    """``exp`` of a difference of scores expressed in exponent units."""
    if HAS_BIAS:
        out = tl.exp2(x * LOG2E)
    else:
        out = tl.exp2(x)
    return out


@triton.jit
def split_lse(m_i, l_i, HAS_BIAS: tl.constexpr):
    """The natural-log LSE of rows with running max ``m_i`` and sum ``l_i`` (in exponent units) as an unevaluated
    sum ``hi + lo``: ``hi`` the rounded float32 LSE, ``lo`` what rounding lost (exact TwoSum).

    ``lo`` matters where ``log(l)`` vanishes beside ``m``: a row hidden entirely by a finite fill (finfo.min) has
    ``hi = m`` and ``lo = log(l)``, so the backward still finds its probabilities 1/l. Fully masked rows
    (``l = 0``) get ``hi = -inf``, ``lo = 0``.
    """
    if HAS_BIAS:
        a = m_i
        b = tl.log(l_i)
    else:
        a = m_i * LN2
        b = tl.log2(l_i) * LN2
    hi = a + b
    b_part = hi - a
    lo = (a - (hi - b_part)) + (b - b_part)
    lo = tl.where(hi == float("-inf"), 0.0, lo)
    return hi, lo


@triton.jit
def load_lse(lse_base, rows, n_rows, HAS_BIAS: tl.constexpr):
    """The saved ``(hi, lo)`` LSE pairs of ``rows`` (a [rows, 2] float32 block at ``lse_base``) in exponent units;
    fully masked rows (-inf) become +inf.

    With +inf every probability of a fully masked row is exactly 0, so such rows contribute no gradient instead of
    spreading NaN (exp(-inf - -inf)) into dK and dV. Without a bias no finite fill can hide a row and ``lo`` is
    rounding noise, returned as 0 (see :func:`probabilities`).
    """
    hi = tl.load(lse_base + rows * 2, mask=rows < n_rows, other=0.0)
    hi = tl.where(hi == float("-inf"), float("inf"), hi)
    if HAS_BIAS:
        lo = tl.load(lse_base + rows * 2 + 1, mask=rows < n_rows, other=0.0)
    else:
        hi = hi * LOG2E
        lo = tl.zeros_like(hi)
    return hi, lo


@triton.jit
def probabilities(s, lse_hi, lse_lo, HAS_BIAS: tl.constexpr):
    """``exp(s - (hi + lo))`` of scores in exponent units, ``hi`` subtracted first (exact for rows whose scores
    all sit at a finite fill); ``lo`` is only read with a bias (see :func:`load_lse`)."""
    if HAS_BIAS:
        out = exp_units((s - lse_hi) - lse_lo, HAS_BIAS)
    else:
        out = exp_units(s - lse_hi, HAS_BIAS)
    return out


@triton.jit
def band_visible(rows, cols, n_cols, upper, lower, HAS_UPPER: tl.constexpr, HAS_LOWER: tl.constexpr):
    """Mask of the (``rows``, ``cols``) pairs in range (``cols < n_cols``) and inside the band
    ``rows - lower <= cols <= rows + upper`` (each bound only if present)."""
    ok = cols < n_cols
    if HAS_UPPER:
        ok = ok & (cols <= rows + upper)
    if HAS_LOWER:
        ok = ok & (cols >= rows - lower)
    return ok


@triton.jit
def tile_list(Counts, Indices, stride_cb, stride_ch, stride_ib, stride_ih, b, h, tile, n_other_tiles):
    """The tile schedule's list of ``tile`` (:meth:`schedule.TileSchedule.by_query_tile` /
    :meth:`~schedule.TileSchedule.by_key_tile`) for batch row ``b`` and query head ``h``: ``(entries, n_partial,
    n_full)``, a pointer to its other-axis tile numbers (partial ones first, then full ones) and the two
    counts. The strides are 0 along the dims the schedule broadcasts over."""
    counts = Counts + b * stride_cb + h * stride_ch + tile * 2
    n_partial = tl.load(counts)
    n_full = tl.load(counts + 1)
    return Indices + b * stride_ib + h * stride_ih + tile * n_other_tiles, n_partial, n_full


@triton.jit
def load_ids(base, idx, stride, n, ENABLED: tl.constexpr):
    """int64 entries ``base[idx * stride]`` of a per-position vector (document ids of any integer width, key
    validity), -1 where ``idx >= n``; zeros when the vector is absent (``ENABLED`` false)."""
    if ENABLED:
        out = tl.load(base + idx * stride, mask=idx < n, other=-1).to(tl.int64)
    else:
        out = tl.zeros_like(idx)
    return out


@triton.jit
def structural_mask(s, q_ids, k_ids, key_ok, HAS_DOCS: tl.constexpr, HAS_KEY_VALID: tl.constexpr):
    """``s`` with -inf where documents differ or the key is padding; the id/validity vectors come
    already shaped for broadcasting against ``s`` (row and column vectors, either orientation)."""
    if HAS_KEY_VALID:
        s = tl.where(key_ok > 0, s, float("-inf"))
    if HAS_DOCS:
        s = tl.where(q_ids == k_ids, s, float("-inf"))
    return s


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


@triton.jit
def _fmix32(h):
    """MurmurHash3's 32-bit finalizer on uint32 tensors (wrapping arithmetic)."""
    h = h ^ (h >> 16)
    h = h * 0x85EBCA6B
    h = h ^ (h >> 13)
    h = h * 0xC2B2AE35
    return h ^ (h >> 16)


@triton.jit
def load_seed(seed_ptr, DROPOUT: tl.constexpr):
    """The call's dropout seed, read from device memory (drawn there by the op, so CUDA graphs replay fresh
    masks); 0, nothing read, without dropout."""
    if DROPOUT:
        out = tl.load(seed_ptr)
    else:
        out = 0
    return out


@triton.jit
def dropout_keep(seed, offset, bh, rows, cols, n_q, n_k, threshold):
    """Keep mask of the (``rows``, ``cols``) elements of flattened (batch, query head) ``bh``: the
    generator of :mod:`flash_fx.kernels.dropout` (int64 counter ``offset + (bh * Nq + i) * Nk + j``, two
    ``fmix32`` rounds, keep iff the word is ``>= threshold``), bit for bit. ``rows``/``cols`` may be a
    column and a row vector or the other way around."""
    counter = offset + (bh * n_q + rows.to(tl.int64)) * n_k + cols.to(tl.int64)
    lo = (counter & 0xFFFFFFFF).to(tl.uint32)
    hi = (counter >> 32).to(tl.uint32)
    key = _fmix32((tl.cast(seed, tl.uint32) ^ 0x9E3779B9) + _fmix32(hi))
    word = _fmix32(_fmix32(lo ^ key) + 0x6A09E667)
    return word.to(tl.int64) >= threshold


@triton.jit
def apply_dropout(x, keep, drop_scale):
    """``x`` with dropped elements zeroed and kept ones scaled by ``drop_scale`` (``1 / (1 - p)``)."""
    return tl.where(keep, x * drop_scale, 0.0)
