"""The spec's pass rule (fa3_spec.md sec 8), with messages that show the numbers.

An implementation may be at most a small multiple less accurate than the same math done in the
input precision: max |out - ref| <= 2 * max |ref_lowp - ref| + 1e-5 and
mean |out - ref| <= 1.5 * mean |ref_lowp - ref| (fp8: 4x and 3x).

The low-precision error is floored by the error of rounding the exact result to the output dtype,
which no implementation can avoid. On the official tests' large tensors the floor never binds; on
the tiny tensors the Triton interpreter can afford, ref_lowp's max error is a noisy estimate and
may land well under one rounding step by luck.
"""

from __future__ import annotations

from typing import Optional

import torch

F64 = torch.float64


def assert_matches_reference(
    name: str,
    out: torch.Tensor,
    ref: torch.Tensor,
    ref_lowp: torch.Tensor,
    *,
    fp8: bool = False,
    softcap: bool = False,
    rows: Optional[torch.Tensor] = None,
    slack: float = 0.0,
    mean_slack: float = 0.0,
) -> None:
    """rows: optional bool mask over the leading dim selecting the elements the contract defines.
    slack / mean_slack: absolute allowances on the max / mean error added to the rule's (0 unless
    a test says why).

    softcap: the official tests allow 3x instead of 2x on the max with softcap (tanh amplifies the
    rounding of the scores), so we do too.
    """
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)}, expected {tuple(ref.shape)}"
    out_dtype = out.dtype
    out, ref, ref_lowp = (t.detach().to("cpu", F64) for t in (out, ref, ref_lowp))
    if rows is not None:
        rows = rows.cpu()
        out, ref, ref_lowp = out[rows], ref[rows], ref_lowp[rows]
    if out.numel() == 0:
        return
    assert not torch.isnan(out).any(), f"{name}: {int(torch.isnan(out).sum())} NaN elements"
    err = (out - ref).abs()
    base = (ref_lowp - ref).abs()
    rounding = (ref.to(out_dtype).to(F64) - ref).abs()
    max_mult = 4.0 if fp8 else (3.0 if softcap else 2.0)
    mean_mult = 3.0 if fp8 else 1.5
    max_err, max_base = err.max().item(), max(base.max().item(), rounding.max().item())
    mean_err, mean_base = err.mean().item(), max(base.mean().item(), rounding.mean().item())
    worst = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
    detail = (
        f"{name}: max err {max_err:.3g} (at {worst}: got {out[worst].item():.6g}, "
        f"want {ref[worst].item():.6g}), low-precision max err {max_base:.3g}; "
        f"mean err {mean_err:.3g}, low-precision mean err {mean_base:.3g}"
    )
    assert max_err <= max_mult * max_base + 1e-5 + slack, detail
    assert mean_err <= mean_mult * mean_base + 1e-7 + mean_slack, detail


def assert_lse_matches(name: str, lse: torch.Tensor, ref: torch.Tensor, *, rows=None, dim=-1) -> None:
    """LSE against the float64 LSE. It has no low-precision twin (the scores a kernel exponentiates
    come from exact products of the inputs, accumulated in fp32), so the bound is a fixed
    fp32-accumulation tolerance. Empty rows must be +inf in both.

    rows: optional bool mask over dimension ``dim`` (the query-token axis).
    """
    assert lse.dtype == torch.float32, f"{name}: dtype {lse.dtype}, expected torch.float32"
    assert lse.shape == ref.shape, f"{name}: shape {tuple(lse.shape)}, expected {tuple(ref.shape)}"
    lse, ref = lse.detach().to("cpu", F64), ref.detach().to("cpu", F64)
    if rows is not None:
        index = [slice(None)] * lse.dim()
        index[dim] = rows.cpu()
        lse, ref = lse[tuple(index)], ref[tuple(index)]
    assert not torch.isnan(lse).any(), f"{name}: NaN in lse"
    inf_ref = torch.isinf(ref)
    mismatch = (torch.isinf(lse) != inf_ref) | (inf_ref & (lse != ref))
    assert not mismatch.any(), (
        f"{name}: {int(mismatch.sum())} rows disagree on being empty (+inf), e.g. got "
        f"{lse[mismatch][:4].tolist()} want {ref[mismatch][:4].tolist()}"
    )
    finite = ~inf_ref
    err = (lse[finite] - ref[finite]).abs()
    bound = 1e-3 + 1e-3 * ref[finite].abs()
    assert (err <= bound).all(), f"{name}: max lse err {err.max().item():.3g}"


def assert_grad_matches(name: str, grad: torch.Tensor, ref: torch.Tensor, ref_lowp: torch.Tensor,
                        *, softcap: bool = False, extra: float = 0.0) -> None:
    """Gradients, as the official tests judge them: 2x (3x with softcap) the low-precision max
    error, floored like the output, plus their small constant: twice the rounding error of
    (g + 0.3) - 0.3 in the gradient's dtype, one rounding step at the gradient's magnitude (what
    delta = rowsum(dO * O) loses when O is rounded to the input dtype; it binds on a few-element
    gradient, where the max error is a noisy estimate), and 3e-4 more with softcap. 1e-4 besides:
    fp32 accumulation noise where the exact gradient is 0 (one key: P = 1). `extra`: a caller's
    allowance on top for a case the official bound does not model (the scores of 1e4 in
    test_reliability_hostile)."""
    assert grad is not None, f"{name}: no gradient"
    assert grad.shape == ref.shape, f"{name}: shape {tuple(grad.shape)}, expected {tuple(ref.shape)}"
    grad_dtype = grad.dtype
    grad, ref, ref_lowp = (t.detach().to("cpu", F64) for t in (grad, ref, ref_lowp))
    assert not torch.isnan(grad).any(), f"{name}: NaN in gradient"
    if grad.numel() == 0:
        return
    err = (grad - ref).abs().max().item()
    rounding = (ref.to(grad_dtype).to(F64) - ref).abs().max().item()
    base = max((ref_lowp - ref).abs().max().item(), rounding)
    mult = 3.0 if softcap else 2.0
    in_dtype = ref.to(grad_dtype)
    step = ((in_dtype + 0.3) - 0.3 - in_dtype).abs().max().to(F64).item()
    slack = 1e-4 + 2 * step + (3e-4 if softcap else 0.0) + extra
    assert err <= mult * base + slack, (f"{name}: max err {err:.3g}, low-precision max err "
                                        f"{base:.3g}, constant {slack:.3g}")
