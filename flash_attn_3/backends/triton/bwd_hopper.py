"""Hopper (sm_90) backward in Gluon: the hot dense case, warp-specialized like FlashAttention-3.

Written for triton 3.6.0's `triton.experimental.gluon` (experimental: `supports()` refuses any other
version and the portable bwd.py kernels run instead).

One program per (block of BLOCK_N = 128 keys, KV head, batch). Its K and V tiles stay in shared
memory while it walks every query block that sees them, for each query head of the KV head's GQA
group (so dk/dv come out summed over the group, with no atomics on them). The CTA is split into
- two consumer warpgroups, each owning 64 of the keys. Scores are computed transposed (keys on
  rows, the wgmma M): S^T = K Q^T and dP^T = V dO^T by wgmma from shared memory; P^T and dS^T
  then feed dV += P^T dO and dK += dS^T Q straight from registers (the accumulator fragment is
  the A-operand fragment), so dK/dV accumulate in fp32 registers with no transpose.
- one producer warp streaming Q and dO tiles by TMA through a STAGES-deep ring.
dQ = dS K needs all 128 keys: both warpgroups put their dS^T half in shared memory, meet on an
mbarrier, and each computes dQ for half of the head dim, which a TMA reduce-add (cp.reduce.async.
bulk.tensor) adds into an fp32 buffer (FA3's scheme; the order of the adds varies, so this path is
not deterministic). `DQ_IN_KERNEL = False` instead leaves dQ to bwd.py's atomic-free dQ kernel.

delta = rowsum(dO * O) and lse * log2(e) come from bwd.py's prep kernel; scores stay in log2 units
(P = exp2(S * scale * log2 e - lse2)). Query rows past seqlen_q read lse2 = +inf (P = 0) and TMA
zero-fills their Q/dO; keys past seqlen_k are zero-filled and masked in the one key block that
has them; the causal diagonal (bottom-right) is masked only on the query blocks that cross it.
"""

from __future__ import annotations

import os

import torch

from ..params import AttnArgs

try:
    import triton
    from triton._C.libtriton import ir as _ir
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language._core import builtin as _builtin
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    _GLUON_OK = triton.__version__.startswith("3.6.")
except ImportError:  # no triton, or a triton without Gluon's Hopper ops
    _GLUON_OK = False

LOG2E = 1.4426950408889634
KEYS_PER_WARPGROUP = 64  # the M of one wgmma; two consumer warpgroups make BLOCK_N = 128
BLOCK_N = 2 * KEYS_PER_WARPGROUP

# head dim -> (BLOCK_M, STAGES, DQ_IN_KERNEL). Registers of one consumer thread at BLOCK_M = 64,
# D = 128: dK and dV accumulators 64 + 64, S^T and dP^T 32 + 32, dQ (half the head dim) 32, the
# row statistics 2 x 16. Shared memory (D = 128): K, V 64 KB, Q and dO 32 KB per stage, dS^T two
# 16 KB buffers, the dQ staging 32 KB.
CONFIGS = {64: (64, 3, True), 128: (64, 2, True)}
# What benchmarks/tune_bwd_hopper.py times besides the defaults and the deterministic variant
# (the default with DQ_IN_KERNEL off), and the tests check. D = 64 at BLOCK_M = 128 spills
# ~570 bytes (S^T and dP^T take 64 registers each) but does twice the work per meeting.
CANDIDATES = {64: [(64, 2, True), (128, 2, True)], 128: []}
# fp32 columns per dQ reduce-add: 128 bytes, the widest TMA box a 128-byte swizzle allows.
DQ_REDUCE_COLS = 32
_MAXNREG = 168
_CONSUMER_REGS = 240
_PRODUCER_REGS = 24


if _GLUON_OK:
    _KEYS = gl.constexpr(KEYS_PER_WARPGROUP)
    _BLOCK_N = gl.constexpr(BLOCK_N)
    _LOG2E = gl.constexpr(LOG2E)

    @_builtin
    def _tma_reduce_add(tensor_desc, coord, src, _semantic=None):
        """global[tile at coord] += src by TMA (cp.reduce.async.bulk.tensor ... .add), completion
        tracked like a TMA store (tma.store_wait). triton 3.6 has the op but no Gluon wrapper."""
        coord = _semantic._convert_to_ir_values(coord, require_i64=False)
        _semantic.builder.create_async_tma_reduce(_ir.DESCRIPTOR_REDUCE_KIND.ADD,
                                                  tensor_desc.handle, coord, src.handle)

    @gluon.jit
    def _program(seqlen_q, seqlen_k, num_heads_kv, num_n_blocks, BLOCK_M: gl.constexpr,
                 CAUSAL: gl.constexpr):
        """-> (b, hk, first key, first query row, query blocks to visit, first query row whose
        block needs no mask). Key blocks of one head are adjacent program ids, so the programs
        running together share that head's Q/dO in L2; block 0 (the most queries when causal)
        goes first."""
        pid = gl.program_id(0)
        n0 = (pid % num_n_blocks) * _BLOCK_N
        bh = pid // num_n_blocks
        offset = seqlen_k - seqlen_q
        if CAUSAL:
            # Query i sees key j iff j <= i + offset (bottom-right diagonal).
            m_start = gl.maximum(n0 - offset, 0) // BLOCK_M * BLOCK_M
            # Every key of the block is visible from query rows >= n0 + _BLOCK_N - 1 - offset.
            m_full = n0 + _BLOCK_N - 1 - offset
        else:
            m_start = 0
            m_full = 0
        if n0 + _BLOCK_N > seqlen_k:
            m_full = seqlen_q  # the key tail: every block takes the mask
        num_m = gl.maximum(gl.cdiv(seqlen_q - m_start, BLOCK_M), 0)
        return bh // num_heads_kv, bh % num_heads_kv, n0, m_start, num_m, m_full

    @gluon.jit
    def _producer(q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_smem, v_smem, bars, shape,
                  CAUSAL: gl.constexpr, STAGES: gl.constexpr):
        kv_ready, q_ready, q_empty, ds_ready = bars
        seqlen_q, seqlen_k, num_heads_kv, num_n_blocks, group = shape
        BLOCK_M: gl.constexpr = q_desc.block_type.shape[1]
        b, hk, n0, m_start, num_m, m_full = _program(seqlen_q, seqlen_k, num_heads_kv,
                                                     num_n_blocks, BLOCK_M, CAUSAL)
        mbarrier.expect(kv_ready, 2 * k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [b, n0, hk, 0], kv_ready, k_smem)
        tma.async_copy_global_to_shared(v_desc, [b, n0, hk, 0], kv_ready, v_smem)
        for it in range(0, group * num_m):
            g = it // num_m
            m0 = m_start + (it - g * num_m) * BLOCK_M
            stage = it % STAGES
            # Fresh barriers pass a wait on parity 1, so the first lap of the ring does not wait.
            mbarrier.wait(q_empty.index(stage), ((it // STAGES) & 1) ^ 1)
            mbarrier.expect(q_ready.index(stage), 2 * q_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(q_desc, [b, m0, hk * group + g, 0],
                                            q_ready.index(stage), q_smem.index(stage))
            tma.async_copy_global_to_shared(do_desc, [b, m0, hk * group + g, 0],
                                            q_ready.index(stage), do_smem.index(stage))

    @gluon.jit
    def _consumer(q_smem, do_smem, k_smem, v_smem, ds_smem, dq_smem, bars, dq_desc, lse2_ptr,
                  delta_ptr, dk_ptr, dv_ptr, dk_strides, dv_strides, softmax_scale, shape,
                  CAUSAL: gl.constexpr, STAGES: gl.constexpr, DQ_IN_KERNEL: gl.constexpr,
                  WG: gl.constexpr):
        kv_ready, q_ready, q_empty, ds_ready = bars
        seqlen_q, seqlen_k, num_heads_kv, num_n_blocks, group = shape
        BLOCK_M: gl.constexpr = q_smem.type.shape[2]
        HEAD_DIM: gl.constexpr = q_smem.type.shape[4]
        HALF_DIM: gl.constexpr = HEAD_DIM // 2
        DQ_COLS: gl.constexpr = dq_desc.block_type.shape[3]
        KEYS: gl.constexpr = _KEYS
        dtype: gl.constexpr = q_smem.dtype
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_M, 16])
        kv_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 16])
        dq_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HALF_DIM, 16])
        # P^T and dS^T feed the dV/dK wgmmas from registers: S^T's accumulator fragment is that
        # operand's fragment, so the conversion moves no data.
        op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=kv_layout,
                                                      k_width=2)
        key_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
        query_layout: gl.constexpr = gl.SliceLayout(0, s_layout)
        qk_scale = softmax_scale * _LOG2E

        b, hk, n0, m_start, num_m, m_full = _program(seqlen_q, seqlen_k, num_heads_kv,
                                                     num_n_blocks, BLOCK_M, CAUSAL)
        k_all = k_smem.reshape([_BLOCK_N, HEAD_DIM])
        k_w = k_all.slice(WG * KEYS, KEYS, dim=0)
        v_w = v_smem.reshape([_BLOCK_N, HEAD_DIM]).slice(WG * KEYS, KEYS, dim=0)
        keys = n0 + WG * KEYS + gl.arange(0, KEYS, layout=key_layout)
        # Visible iff key <= query + offset and key < seqlen_k, as one bound per key: the column
        # compare is then one per element.
        if CAUSAL:
            first_query = keys - (seqlen_k - seqlen_q)
        else:
            first_query = gl.zeros([KEYS], gl.int32, key_layout)
        first_query = gl.where(keys < seqlen_k, first_query, 2147483647)
        dk = gl.zeros([KEYS, HEAD_DIM], gl.float32, kv_layout)
        dv = gl.zeros([KEYS, HEAD_DIM], gl.float32, kv_layout)
        mbarrier.wait(kv_ready, 0)

        for it in range(0, group * num_m):
            g = it // num_m
            m0 = m_start + (it - g * num_m) * BLOCK_M
            hq = hk * group + g
            stage = it % STAGES
            queries = m0 + gl.arange(0, BLOCK_M, layout=query_layout)
            row = (b * num_heads_kv * group + hq).to(gl.int64) * seqlen_q
            # Rows past seqlen_q: lse2 = +inf makes their P (and so dS) zero.
            lse2 = gl.load(lse2_ptr + row + queries, mask=queries < seqlen_q, other=float("inf"))
            delta = gl.load(delta_ptr + row + queries, mask=queries < seqlen_q, other=0.0)
            mbarrier.wait(q_ready.index(stage), (it // STAGES) & 1)
            q = q_smem.index(stage).reshape([BLOCK_M, HEAD_DIM])
            do = do_smem.index(stage).reshape([BLOCK_M, HEAD_DIM])
            s_tok = warpgroup_mma(k_w, q.permute((1, 0)),
                                  gl.zeros([KEYS, BLOCK_M], gl.float32, s_layout),
                                  use_acc=False, is_async=True)
            s = warpgroup_mma_wait(num_outstanding=0, deps=(s_tok, ))
            # dP^T is issued only now, so its accumulator and S^T are not both live next to
            # dK and dV (with both in flight ptxas spilled ~600 bytes); P is computed under it.
            dp_tok = warpgroup_mma(v_w, do.permute((1, 0)),
                                   gl.zeros([KEYS, BLOCK_M], gl.float32, s_layout),
                                   use_acc=False, is_async=True)
            p = gl.exp2(s * qk_scale - gl.expand_dims(lse2, 0))
            if m0 < m_full:
                ok = gl.expand_dims(queries, 0) >= gl.expand_dims(first_query, 1)
                p = gl.where(ok, p, 0.0)
            dp = warpgroup_mma_wait(num_outstanding=0, deps=(dp_tok, ))
            ds = p * (dp - gl.expand_dims(delta, 0))
            p_op = gl.convert_layout(p.to(dtype), op_layout, assert_trivial=True)
            ds_op = gl.convert_layout(ds.to(dtype), op_layout, assert_trivial=True)
            dv_tok = warpgroup_mma(p_op, do, dv, is_async=True)
            dk_tok = warpgroup_mma(ds_op, q, dk, is_async=True)
            if DQ_IN_KERNEL:
                # dQ[:, half WG] = dS K[:, half WG] over both warpgroups' keys: publish this
                # half of dS^T, wait for the other's. Two buffers: a warpgroup rewrites one only
                # after the other has passed the next meeting, i.e. finished its dQ wgmma on it.
                buf = it % 2
                ds_smem.index(buf).slice(WG * KEYS, KEYS, dim=0).store(ds.to(dtype))
                fence_async_shared()
                mbarrier.arrive(ds_ready.index(buf))
                mbarrier.wait(ds_ready.index(buf), (it // 2) & 1)
                dq_tok = warpgroup_mma(
                    ds_smem.index(buf).permute((1, 0)),
                    k_all.slice(WG * HALF_DIM, HALF_DIM, dim=1),
                    gl.zeros([BLOCK_M, HALF_DIM], gl.float32, dq_layout), use_acc=False,
                    is_async=True)
                dv, dk, dq, p_op, ds_op = warpgroup_mma_wait(
                    num_outstanding=0, deps=(dv_tok, dk_tok, dq_tok, p_op, ds_op))
                mbarrier.arrive(q_empty.index(stage))
                # The previous reduce has read the staging buffer by now (a whole iteration ago).
                tma.store_wait(pendings=0)
                dq_smem.reshape([BLOCK_M, HALF_DIM]).store(dq * softmax_scale)
                fence_async_shared()
                # One reduce per 128-byte column chunk: the TMA box of a 128-byte swizzle is at
                # most that wide, and the tile's chunks lie one after the other in shared memory.
                for c in gl.static_range(HALF_DIM // DQ_COLS):
                    _tma_reduce_add(dq_desc, [b, m0, hq, WG * HALF_DIM + c * DQ_COLS],
                                    dq_smem.slice(c * DQ_COLS, DQ_COLS, dim=3))
            else:
                dv, dk, p_op, ds_op = warpgroup_mma_wait(
                    num_outstanding=0, deps=(dv_tok, dk_tok, p_op, ds_op))
                mbarrier.arrive(q_empty.index(stage))
        if DQ_IN_KERNEL:
            tma.store_wait(pendings=0)

        # dK, dV of this warpgroup's keys, clipped at seqlen_k.
        rows = gl.expand_dims(n0 + WG * KEYS + gl.arange(0, KEYS, layout=gl.SliceLayout(
            1, kv_layout)), 1)
        cols = gl.expand_dims(gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, kv_layout)), 0)
        keep = (rows < seqlen_k) & (cols < HEAD_DIM)  # the column term only broadcasts
        dk_at = (dk_ptr + b.to(gl.int64) * dk_strides[0] + hk * dk_strides[2]
                 + rows.to(gl.int64) * dk_strides[1] + cols)
        dv_at = (dv_ptr + b.to(gl.int64) * dv_strides[0] + hk * dv_strides[2]
                 + rows.to(gl.int64) * dv_strides[1] + cols)
        gl.store(dk_at, (dk * softmax_scale).to(dtype), mask=keep)
        gl.store(dv_at, dv.to(dtype), mask=keep)

    @gluon.jit
    def _bwd_kernel(q_desc, do_desc, k_desc, v_desc, dq_desc, lse2_ptr, delta_ptr, dk_ptr, dv_ptr,
                    stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh,
                    softmax_scale, seqlen_q, seqlen_k, num_heads_kv, num_n_blocks, group,
                    CAUSAL: gl.constexpr, STAGES: gl.constexpr, DQ_IN_KERNEL: gl.constexpr,
                    CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr):
        dtype: gl.constexpr = q_desc.dtype
        BLOCK_M: gl.constexpr = q_desc.block_type.shape[1]
        HEAD_DIM: gl.constexpr = q_desc.block_type.shape[3]
        q_smem = gl.allocate_shared_memory(dtype, [STAGES] + q_desc.block_type.shape,
                                           q_desc.layout)
        do_smem = gl.allocate_shared_memory(dtype, [STAGES] + do_desc.block_type.shape,
                                            do_desc.layout)
        k_smem = gl.allocate_shared_memory(dtype, k_desc.block_type.shape, k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, v_desc.block_type.shape, v_desc.layout)
        if DQ_IN_KERNEL:
            ds_smem = gl.allocate_shared_memory(
                dtype, [2, _BLOCK_N, BLOCK_M],
                gl.NVMMASharedLayout.get_default_for([_BLOCK_N, BLOCK_M], dtype))
            # Each warpgroup stages its half of the head dim, in the reduce's 128-byte chunks.
            dq_smem0 = gl.allocate_shared_memory(gl.float32, [1, BLOCK_M, 1, HEAD_DIM // 2],
                                                 dq_desc.layout)
            dq_smem1 = gl.allocate_shared_memory(gl.float32, [1, BLOCK_M, 1, HEAD_DIM // 2],
                                                 dq_desc.layout)
        else:  # not touched: stand-ins for the arguments
            ds_smem = k_smem
            dq_smem0 = k_smem
            dq_smem1 = k_smem
        kv_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        q_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        q_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        ds_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        mbarrier.init(kv_ready, count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(q_ready.index(i), count=1)
            # Both consumer warpgroups must release a stage before it is refilled.
            mbarrier.init(q_empty.index(i), count=2)
        for i in gl.static_range(2):
            mbarrier.init(ds_ready.index(i), count=2)
        bars = (kv_ready, q_ready, q_empty, ds_ready)
        shape = (seqlen_q, seqlen_k, num_heads_kv, num_n_blocks, group)

        # The argument tuples stay inline: a tuple bound to a name turns its constexprs into
        # tensors.
        gl.warp_specialize([
            (_consumer, (q_smem, do_smem, k_smem, v_smem, ds_smem, dq_smem0, bars, dq_desc,
                         lse2_ptr, delta_ptr, dk_ptr, dv_ptr,
                         (stride_dkb, stride_dks, stride_dkh),
                         (stride_dvb, stride_dvs, stride_dvh), softmax_scale, shape, CAUSAL,
                         STAGES, DQ_IN_KERNEL, 0)),
            (_consumer, (q_smem, do_smem, k_smem, v_smem, ds_smem, dq_smem1, bars, dq_desc,
                         lse2_ptr, delta_ptr, dk_ptr, dv_ptr,
                         (stride_dkb, stride_dks, stride_dkh),
                         (stride_dvb, stride_dvs, stride_dvh), softmax_scale, shape, CAUSAL,
                         STAGES, DQ_IN_KERNEL, 1)),
            (_producer, (q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_smem, v_smem, bars,
                         shape, CAUSAL, STAGES)),
        ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


def _descriptor(x: torch.Tensor, rows: int, cols: int = None, swizzle: int = None):
    """Rank-4 TMA descriptor over (B, S, H, D) reading one (rows x cols) tile of one head."""
    block = [1, rows, 1, cols or x.shape[-1]]
    dtype = {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16,
             torch.float32: gl.float32}[x.dtype]
    layout = gl.NVMMASharedLayout.get_default_for(block, dtype)
    if swizzle is not None:
        layout = gl.NVMMASharedLayout(swizzle, x.element_size() * 8, rank=4)
    return TensorDescriptor(x, list(x.shape), list(x.stride()), block, layout)


def _key_descriptor(x: torch.Tensor):
    """K's (and V's) tile: each warpgroup's dQ wgmma reads half of K's columns, so the swizzle
    pattern is at most that half wide (64 bytes at D = 64) and the half starts on a pattern."""
    return _descriptor(x, BLOCK_N, swizzle=min(128, x.shape[-1] // 2 * x.element_size()))


def _tma_ok(x: torch.Tensor) -> bool:
    # TMA needs a 16-byte aligned base, 16-byte aligned nonzero strides and a unit inner stride.
    return (x.stride(-1) == 1 and x.data_ptr() % 16 == 0
            and all(s > 0 and s * x.element_size() % 16 == 0 for s in x.stride()[:-1]))


def supports(a: AttnArgs, deterministic: bool = False) -> bool:
    """True when this kernel computes the call: sm_90, triton 3.6 Gluon, fp16/bf16 dense
    (B, S, H, D) q/k/v with head dim 64/128, causal or not, GQA. Deterministic calls take it too:
    they keep its dK/dV and leave dQ to bwd.py's atomic-free kernel (H100, 15:03 UTC: 0.91x of
    the default's speed, against 0.75x for bwd.py's deterministic path). FLASH_ATTN_3_GLUON=0
    turns it off, as for the forward."""
    q, k, v = a.q, a.k, a.v
    if not (_GLUON_OK and q.is_cuda
                             and os.environ.get("FLASH_ATTN_3_GLUON", "1") != "0"
                             and torch.cuda.get_device_capability(q.device) == (9, 0)):
        return False
    if q.dtype not in (torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        return False
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or k.shape != v.shape:
        return False
    extras = (a.qv, a.cu_seqlens_q, a.cu_seqlens_k, a.seqused_q, a.seqused_k, a.page_table,
              a.kv_batch_idx, a.leftpad_k, a.q_descale, a.k_descale, a.v_descale, a.sinks)
    if any(x is not None for x in extras):
        return False
    if a.softcap != 0.0 or a.attention_chunk != 0 or a.cp_world_size != 1:
        return False
    if a.window_left != -1 or a.window_right not in (-1, 0) or not a.softmax_scale > 0:
        return False
    batch, seqlen_q, heads_q, head_dim = q.shape
    if k.shape[0] != batch or head_dim not in CONFIGS or k.shape[-1] != head_dim:
        return False
    if q.numel() == 0 or k.numel() == 0 or heads_q % k.shape[2] != 0:
        return False
    return all(_tma_ok(x) for x in (q, k, v))


def backward(dout, q, k, v, out, lse, a: AttnArgs, deterministic: bool = False, config=None):
    """dq, dk, dv (shaped like q, k, v; GQA summed over each KV head's query group) for a call
    `supports()` accepts; config (BLOCK_M, STAGES, DQ_IN_KERNEL) overrides CONFIGS."""
    from . import bwd

    batch, seqlen_q, heads_q, head_dim = q.shape
    seqlen_k, heads_kv = k.shape[1], k.shape[2]
    block_m, stages, dq_in_kernel = config or CONFIGS[head_dim]
    if deterministic:
        dq_in_kernel = False
    if dout.stride(-1) != 1 or not _tma_ok(dout):
        dout = dout.contiguous()
    lse2, delta = bwd.prep(out, dout, lse, a)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if dq_in_kernel:
        dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dq_desc = _descriptor(dq_acc, block_m, DQ_REDUCE_COLS)
    else:
        dq_acc = None
        dq_desc = _descriptor(q, block_m)  # not read: stands in for the argument
    num_n_blocks = triton.cdiv(seqlen_k, BLOCK_N)
    _bwd_kernel[(num_n_blocks * heads_kv * batch, )](
        _descriptor(q, block_m), _descriptor(dout, block_m),
        _key_descriptor(k), _key_descriptor(v), dq_desc,
        lse2, delta, dk, dv, *dk.stride()[:3], *dv.stride()[:3], a.softmax_scale, seqlen_q,
        seqlen_k, heads_kv, num_n_blocks, heads_q // heads_kv, a.window_right == 0, stages,
        bool(dq_in_kernel), _CONSUMER_REGS, _PRODUCER_REGS, num_warps=4, maxnreg=_MAXNREG)
    if dq_in_kernel:
        return dq_acc.to(q.dtype), dk, dv
    return bwd.dq_only(dout, q, k, v, lse2, delta, a), dk, dv
