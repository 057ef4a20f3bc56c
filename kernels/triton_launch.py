"""The Triton kernels' arguments, by name, in one group per feature.

Every kernel names its parameters alike (``Q`` with ``stride_qb, stride_qh, stride_qm, stride_qd``, ``Bias`` with
``stride_bb ...``, the ``HAS_*`` flags), so each group below is a dict the launchers merge and pass by keyword;
a group contributes a dummy pointer, zero strides and its flags off when its feature is absent. q, k, v and the
gradients are passed as they are (any strides), never copied.
"""

from __future__ import annotations

import functools

import torch
from flash_fx.kernels import config, dropout
from flash_fx.kernels.schedule import TileSchedule
from flash_fx.kernels.spec import MOD_OPS, AttentionSpec, ModStep

Group = dict[str, object]


def tensor(name: str, strides: str, x: torch.Tensor | None, dummy: torch.Tensor) -> Group:
    """``name`` (the pointer) and ``strides`` (``stride_qb,stride_qh,...`` as one comma-separated string) of ``x``;
    a dummy pointer and zero strides for None."""
    names = strides.split(",")
    values = (0,) * len(names) if x is None else x.stride()
    return {name: dummy if x is None else x, **dict(zip(names, values, strict=True))}


def shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec) -> Group:
    """Sizes, the scale, the GQA head mapping and the head-dim constants of q and k (``HEAD_DIM``) and of v, the
    output and its gradient (``HEAD_DIM_V``), what every kernel reads."""
    head_dim, value_dim = q.shape[-1], v.shape[-1]
    return dict(num_heads=q.shape[1], num_kv_heads=k.shape[1], group_size=q.shape[1] // k.shape[1], n_q=q.shape[2],
                n_k=k.shape[2], sm_scale=spec.scale, KV_TILED=spec.kv_heads_tiled, HEAD_DIM=head_dim,
                BLOCK_D=config.padded_head_dim(head_dim), HEAD_DIM_V=value_dim,
                BLOCK_DV=config.padded_head_dim(value_dim), UPCAST_DOT=config.upcast_dot(q.dtype),
                INPUT_PRECISION=config.input_precision(q.dtype))


def inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Group:
    """Q, K, V and their strides."""
    return {**tensor("Q", "stride_qb,stride_qh,stride_qm,stride_qd", q, q),
            **tensor("K", "stride_kb,stride_kh,stride_kn,stride_kd", k, q),
            **tensor("V", "stride_vb,stride_vh,stride_vn,stride_vd", v, q)}


def terms(spec: AttentionSpec, dummy: torch.Tensor) -> Group:
    """The score terms: the bias (expanded [B, Hq, Nq, Nk]), the ALiBi slopes and the relative vector."""
    bias, alibi, relative = spec.bias, spec.alibi, spec.relative
    return {
        **tensor("Bias", "stride_bb,stride_bh,stride_bm,stride_bn", None if bias is None else bias.values, dummy),
        **tensor("Slopes", "stride_sb,stride_sh", None if alibi is None else alibi.slopes, dummy),
        **tensor("Rel", "stride_rb,stride_rh,stride_rr", None if relative is None else relative.values, dummy),
        "HAS_BIAS": bias is not None, "FULL_READS_BIAS": bias is not None and not bias.holds_masks,
        "HAS_ALIBI": alibi is not None,
        "ALIBI_SYMMETRIC": alibi is not None and alibi.symmetric, "HAS_REL": relative is not None,
    }


def masks(spec: AttentionSpec, dummy: torch.Tensor) -> Group:
    """The structural masks of partial tiles: band offsets, the key-valid (int8) and document (int32 or int64) vectors
    [B, N] and the flags."""
    band, documents = spec.band, spec.documents
    key_valid = None if spec.key_valid is None else spec.key_valid.view(torch.int8)
    return {
        **tensor("KeyValid", "stride_kvb,stride_kvn", key_valid, dummy),
        **tensor("QDoc", "stride_qdb,stride_qdm", None if documents is None else documents.q_ids, dummy),
        **tensor("KDoc", "stride_kdb,stride_kdn", None if documents is None else documents.k_ids, dummy),
        "upper": band.upper or 0, "lower": band.lower or 0,
        "HAS_UPPER": band.upper is not None, "HAS_LOWER": band.lower is not None,
        "HAS_KEY_VALID": key_valid is not None, "HAS_DOCS": documents is not None,
    }


def schedule(tiles: TileSchedule, dummy: torch.Tensor, *, by_keys: bool) -> Group:
    """The tile schedule's lists (per query tile, or per key tile if ``by_keys``) with their batch and head
    strides, 0 along the dims the schedule broadcasts over (the kernels index them with the real batch row and
    query head)."""
    counts, indices = tiles.by_key_tile() if by_keys else tiles.by_query_tile()
    counts, indices = counts.to(dummy.device), indices.to(dummy.device)

    def strides(t: torch.Tensor) -> tuple[int, int]:
        return (t.stride(0) if t.shape[0] > 1 else 0, t.stride(1) if t.shape[1] > 1 else 0)

    (cb, ch), (ib, ih) = strides(counts), strides(indices)
    return dict(Counts=counts, Indices=indices, stride_cb=cb, stride_ch=ch, stride_ib=ib, stride_ih=ih)


def dropout_group(spec: AttentionSpec, dummy: torch.Tensor) -> Group:
    """Dropout's seed (a pointer to it on the device), offset, threshold, scale and flag."""
    return dropout.kernel_arguments(spec.dropout, dummy)


def mod(spec: AttentionSpec, dummy: torch.Tensor) -> Group:
    """The score modification: ``MOD`` (four bits per step's opcode, the first step lowest; 0 without one), its
    constants (float32 [steps, 2] on the device) and the head factor with its strides."""
    score_mod = spec.score_mod
    if score_mod is None:
        return {"ModParams": dummy, "MOD": 0, **tensor("ModFactor", "stride_mfb,stride_mfh", None, dummy)}
    code = sum(MOD_OPS[step.op] << (4 * i) for i, step in enumerate(score_mod.steps))
    return {"ModParams": _mod_params(score_mod.steps, dummy.device), "MOD": code,
            **tensor("ModFactor", "stride_mfb,stride_mfh", score_mod.head_factor, dummy)}


@functools.lru_cache(maxsize=256)
def _mod_params(steps: tuple[ModStep, ...], device: torch.device) -> torch.Tensor:
    """The steps' constants (float32 [steps, 2]) on ``device``, copied there once per modification and device: a
    call never copies from the host, which a CUDA-graph capture would not allow."""
    return torch.tensor([[step.a, step.b] for step in steps], dtype=torch.float32, device=device)
