"""The counter-based random stream of fused attention dropout, in PyTorch.

The keep mask is never stored. Element (query ``i``, key ``j``) of flattened (batch, query head) ``bh``
(``bh = b * Hq + h``) gets the 64-bit counter ``c = offset + (bh * Nq + i) * Nk + j`` (unique per element
and call for distinct offsets; computed in int64). Its 32-bit random word is two rounds of the
MurmurHash3 32-bit finalizer ``fmix32`` (all arithmetic modulo 2**32)::

    key  = fmix32((seed ^ 0x9E3779B9) + fmix32(hi32(c)))
    word = fmix32(fmix32(lo32(c) ^ key) + 0x6A09E667)

and the element is kept iff ``word >= threshold(p) = floor(p * 2**32)``, i.e. with probability
``1 - threshold / 2**32`` (1 - p up to 2**-32). For a fixed key ``fmix32(lo ^ key)`` is a bijection of
the low word, so counters within one 2**32 block never share a word. Kept probabilities are scaled by
``1 / (1 - p)``, as ``torch.nn.functional.dropout`` does.

The Triton kernels compute the same words with uint32 tensor ops (:func:`triton_common.dropout_keep`);
this module computes them with int64 tensor ops whose products never overflow (:func:`_mul32`), so the
tiled PyTorch path and the Triton path drop exactly the same elements for the same (seed, offset).
:func:`dropout_keep_mask` materializes the whole mask for tests and debugging.
"""

from __future__ import annotations

import torch
from flash_fx.kernels.spec import AttentionInputError, Dropout

__all__ = ["dropout_keep_mask", "keep_tile", "kernel_arguments", "threshold"]

MASK32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9
ROUND2 = 0x6A09E667
FMIX_C1 = 0x85EBCA6B
FMIX_C2 = 0xC2B2AE35


def kernel_arguments(dropout: Dropout, dummy: torch.Tensor) -> dict[str, object]:
    """The Triton kernels' arguments of ``dropout`` (validated), by name: the seed as an int64 tensor on ``dummy``'s
    device that the kernels read (the op's own seed tensor as it is; an int seed, from direct calls, copied there),
    ``dummy`` itself without dropout (not read)."""
    seed = dummy
    if dropout.enabled:
        seed = dropout.seed if isinstance(dropout.seed, torch.Tensor) else torch.tensor(
            [dropout.seed], dtype=torch.int64, device=dummy.device)
    return dict(SeedPtr=seed, offset=dropout.offset, threshold=threshold(dropout.p), drop_scale=dropout.scale,
                DROPOUT=dropout.enabled)


def threshold(dropout_p: float) -> int:
    """The 32-bit threshold below which a random word drops its element: ``floor(p * 2**32)``."""
    return min(int(dropout_p * 2**32), MASK32)


def _mul32(a: torch.Tensor, c: int) -> torch.Tensor:
    """``a * c mod 2**32`` for int64 ``a`` in [0, 2**32) without int64 overflow (split into 16-bit halves)."""
    return ((a & 0xFFFF) * c + (((a >> 16) * (c & 0xFFFF)) << 16)) & MASK32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finalizer on int64 tensors holding values in [0, 2**32)."""
    h = h ^ (h >> 16)
    h = _mul32(h, FMIX_C1)
    h = h ^ (h >> 13)
    h = _mul32(h, FMIX_C2)
    return h ^ (h >> 16)


def random_words(seed: int | torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """The 32-bit random word (int64 tensor in [0, 2**32)) of every int64 counter (``seed``: an int, or an int64
    tensor of one element, read on its device)."""
    key = _fmix32(((seed ^ GOLDEN) + _fmix32(counters >> 32)) & MASK32)
    return _fmix32(((_fmix32((counters & MASK32) ^ key)) + ROUND2) & MASK32)


def keep_tile(seed: int | torch.Tensor, offset: int, bh: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, n_q: int,
              n_k: int, dropout_p: float) -> torch.Tensor:
    """Bool keep mask of the elements (``bh``, ``rows``, ``cols``), all broadcast against each other.

    ``bh`` indexes flattened (batch, query head); ``rows`` and ``cols`` are query and key indices.
    """
    counters = offset + (bh.long() * n_q + rows.long()) * n_k + cols.long()
    return random_words(seed, counters) >= threshold(dropout_p)


def dropout_keep_mask(seed: int, offset: int, batch_heads: int, nq: int, nk: int, p: float,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """The keep mask [batch_heads, nq, nk] (bool) that the kernels use for ``(seed, offset, p)``.

    Entry ``[b * Hq + h, i, j]`` says whether probability ``P[b, h, i, j]`` survives dropout; the
    kernels output ``(softmax(S) * mask / (1 - p)) @ V``.
    """
    if not 0.0 <= p < 1.0:
        raise AttentionInputError(f"dropout_p must lie in [0, 1), got {p}")
    bh = torch.arange(batch_heads, device=device)[:, None, None]
    rows = torch.arange(nq, device=device)[None, :, None]
    cols = torch.arange(nk, device=device)[None, None, :]
    return keep_tile(seed, offset, bh, rows, cols, nq, nk, p)
