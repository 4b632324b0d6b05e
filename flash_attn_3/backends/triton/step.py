"""A repeat eager flash_attn_with_kvcache call replayed from a plan: the decode fast path.

A decode loop makes the same call every step with new tensors of the same layout. The interface
keys each call by everything validation and dispatch read (shapes, strides, dtypes, devices,
flags; interface.py) and asks once for a plan; from then on a step costs its allocations, one
pointer read per tensor and the C launches of the append and decode (and combine) kernels, with
every other argument fixed when planned (launch.Bound). Results are those of the slow path: the
same kernels with the same arguments, except that the decode kernel adds the appended token
count to seqused_k itself (`seqused_add`) instead of a `cache_seqlens + n` op.

A step that appends one dense token per row (the decode step of a serving loop) is one launch:
the decode kernel writes the new row into the cache and rotates q and the new key itself
(decode.Append). Longer or packed appends keep the append_kv launch before the decode launch.

Allocations: `out`, the lse (its own tensor only when the caller returns it; else it shares one
fp32 workspace with the split partials) and the rotated q (two-launch steps with rotary). A split
launch that merges in place takes its ticket counters from the device's ring (decode.TicketRing)
on every call.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch

from ..params import AttnArgs
from . import decode
from .append_kv import append_launch
from .launch import Bound, Unbindable

# True: one-token appends run inside the decode launch; False plans them as append_kv + decode
# (the profile script times both; the tests compare them bit for bit). H100, B=1 ctx 1k: 35.8
# against 53.4 us eager, 11.2 against 11.5 us of GPU time (docs/perf-notes.md, lead item 14).
FUSE_APPEND = True


class StepPlan:
    """plan(inputs) -> (out, lse or None), or None when a pointer's 16-byte residue differs from
    the planned one (Triton compiled for that alignment: the caller takes the slow path; nothing
    has been written then)."""

    def __init__(self, num_inputs: int, allocs, bounds: Sequence[Bound], out_role: int, lse_role: Optional[int],
                 tickets: Optional[tuple] = None):
        self.num_inputs = num_inputs
        self.allocs = allocs  # (size, stride, dtype, device) per allocated role, after the inputs
        self.tickets = tickets  # (ring, counters): the last role, its pointer taken per call
        self.bounds = bounds
        residues = {}
        for bound in bounds:
            residues.update(bound.residues)
        self.residues = sorted(residues.items())
        self.out_role, self.lse_role = out_role, lse_role

    def __call__(self, inputs: Sequence[Optional[torch.Tensor]]):
        device = self.allocs[0][3]  # out's, which is q's
        if device.type == "cuda" and device.index != torch.cuda.current_device():
            with torch.cuda.device(device):  # as routes.on_device: launches use the current device
                return self._replay(inputs)
        return self._replay(inputs)

    def _replay(self, inputs: Sequence[Optional[torch.Tensor]]):
        roles = list(inputs)
        for size, stride, dtype, device in self.allocs:
            roles.append(torch.empty_strided(size, stride, dtype=dtype, device=device))
        ptrs = [0 if t is None else t.data_ptr() for t in roles]
        if self.tickets is not None:
            ring, counters = self.tickets
            roles.append(ring.slots)
            ptrs.append(ring.pointer(counters))
        for role, residue in self.residues:
            if ptrs[role] & 15 != residue:
                return None
        for bound in self.bounds:
            bound.go(roles, ptrs)
        return roles[self.out_role], None if self.lse_role is None else roles[self.lse_role]


def _alloc(t: torch.Tensor):
    return tuple(t.shape), t.stride(), t.dtype, t.device


def plan(inputs: Sequence[Optional[torch.Tensor]], append_args: Optional[tuple], a: AttnArgs,
         seqused_add: int, need_lse: bool) -> Optional[StepPlan]:
    """A StepPlan of a call (append_kv's arguments or None, then the attention over the cache),
    or None when the attention does not go to the decode kernel or an argument is no view of an
    input. `a` is the attention as the slow path builds it, with seqused_k = cache_seqlens (the
    kernel adds seqused_add) and q before rotary."""
    if decode.supports(a) is not None:
        return None
    allocated = []
    launches = []
    fused = None
    if append_args is not None and FUSE_APPEND:
        (_, _, k_new, v_new, _, cos, sin, _, _, _, _, _, cu_seqlens_k_new, rotary_seqlens, interleaved, per_token,
         _) = append_args
        if decode.fusable_append(a, k_new, cu_seqlens_k_new):
            fused = decode.Append(k_new, v_new, cos, sin, rotary_seqlens, interleaved, per_token)
    if append_args is not None and fused is None:
        q_out, append = append_launch(*append_args)
        if q_out is not a.q:
            allocated.append(q_out)
            a = dataclasses.replace(a, q=q_out)
        if append is not None:
            launches.append(append)
    out, lse = decode.outputs(a)
    allocated.insert(0, out)
    lse_numel = lse.numel()
    # The lse starts the workspace at a 16-byte multiple so the partials keep their alignment.
    lse_slot = 0 if need_lse else -(-lse_numel // 4) * 4
    workspace_numel = lse_slot + decode.partials_numel(a)
    partials = None
    if workspace_numel:
        workspace = torch.empty(workspace_numel, dtype=torch.float32, device=a.q.device)
        allocated.append(workspace)
        partials = workspace[lse_slot:] if workspace_numel > lse_slot else None
        if not need_lse:
            lse = workspace[:lse_numel].view(lse.shape)
    if need_lse:
        allocated.insert(1, lse)
    counters = decode.fused_tiles(a)
    # Without a ring yet (this first call is being captured) the plan merges in a second launch.
    ring = decode.ticket_ring(a.q.device) if counters else None
    launches += decode.launches(a, out, lse, partials, seqused_add, tickets=ring.slots if ring else None,
                                append=fused)
    roles = list(inputs) + allocated + ([ring.slots] if ring else [])
    try:
        bounds = [Bound(launch, roles) for launch in launches]
    except Unbindable:
        return None
    return StepPlan(len(inputs), [_alloc(t) for t in allocated], bounds, len(inputs),
                    len(inputs) + 1 if need_lse else None, (ring, counters) if ring else None)
