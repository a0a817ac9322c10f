"""Fused cosine classifier head (docs/methods.md §1.1) and head + loss without the full logit matrix.

* :func:`cosine_logits` — ``normalize(features, dim=1) @ normalize(weight, dim=0)`` with
  ``F.normalize`` eps semantics (divide by ``max(‖v‖, eps)``), as one GEMM plus a fused scaling epilogue;
  backward: two GEMMs plus fused tangent-projection epilogues (``torch.ops.ltkernels.cosine_logits``).
* :class:`NormedLinear` — the official module (weight ``(in, out)``), loading official checkpoints and,
  with ``layout="out_in"``, storing a ``(out, in)`` weight instead (both layouts load into either).
* :func:`cosine_head_loss` — ``features, weight, target -> loss`` for every loss module of
  :mod:`ltkernels.losses` / :mod:`ltkernels.reference` that takes cosine input (LDAM, KPS, CosFace, GCL,
  GCLAng, ArcFace, and the plain CE-type ones), processing the batch in row chunks so that only one
  chunk of logits exists at a time.

Dtypes: float32 and float64 compute in their precision. float16 and bfloat16 operands stay 16-bit in the
GEMMs (tensor cores on CUDA, the CPU's bf16 GEMM), which accumulate in fp32, and the norms and epilogues run
in fp32; the cosines come back in the 16-bit dtype. Under autocast both operands are cast to the autocast
dtype first, as ``F.linear`` does (a float32 weight with bfloat16 features: bfloat16 cosines); outside
autocast operands of different dtypes are promoted to the common dtype.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from . import _ops  # noqa: F401  (loads the extension; fake kernels and autograd: _ops.py)
from ._ops import _cosine_acc_dtype as _acc_dtype

__all__ = ["cosine_logits", "NormedLinear", "cosine_head_loss"]

ops = torch.ops.ltkernels
_COSINE_LOGITS = ops.cosine_logits.default

LAYOUTS = ("in_out", "out_in")
EPS = 1e-12
# Default chunk of cosine_head_loss: about this many logits per chunk.
CHUNK_ELEMENTS = 1 << 23


# ---------------------------------------------------------------------------------------------------
# Functional API
# ---------------------------------------------------------------------------------------------------
def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def _prepare(features, weight, layout: str, eps: float, fn: str):
    """Validates (clear Python exceptions) and returns (features, weight as a (D, C) view)."""
    if not isinstance(features, Tensor) or not isinstance(weight, Tensor):
        raise TypeError(f"{fn}: features and weight must be tensors, got {type(features).__name__} and "
                        f"{type(weight).__name__}")
    _check_layout(layout)
    if features.dim() != 2:
        raise ValueError(f"{fn}: features must be 2-D (N, D), got shape {tuple(features.shape)}")
    if weight.dim() != 2:
        want = "(D, C)" if layout == "in_out" else "(C, D)"
        raise ValueError(f"{fn}: weight must be 2-D {want}, got shape {tuple(weight.shape)}")
    for name, t in (("features", features), ("weight", weight)):
        if not t.is_floating_point():
            raise TypeError(f"{fn}: {name} must be a floating-point tensor, got {t.dtype}")
    if features.device != weight.device:
        raise ValueError(f"{fn}: features are on {features.device} but weight is on {weight.device}")
    if not (isinstance(eps, (int, float)) and eps > 0 and math.isfinite(eps)):
        raise ValueError(f"{fn}: eps must be a positive finite number, got {eps!r}")
    w = weight if layout == "in_out" else weight.t()
    if features.shape[1] != w.shape[0]:
        want = f"({features.shape[1]}, C)" if layout == "in_out" else f"(C, {features.shape[1]})"
        raise ValueError(f"{fn}: features have D={features.shape[1]} but weight has shape {tuple(weight.shape)} "
                         f"(layout={layout!r} expects {want})")
    return _common_dtype(features, w, fn)


def _common_dtype(features: Tensor, w: Tensor, fn: str):
    """Both operands in the dtype the op computes in: the autocast dtype when autocast is on for their
    device (float64 operands are left alone, as autocast leaves them), else the promoted dtype of the two
    when one of them is 16-bit. float32 with float64 stays an error: silently widening a float32 model's
    head, or narrowing a float64 check, would hide a mistake."""
    dev = features.device.type
    # (is_autocast_enabled raises for device types without an autocast mode, e.g. "meta")
    if torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        features = features if features.dtype == torch.float64 else features.to(dt)
        w = w if w.dtype == torch.float64 else w.to(dt)
    elif features.dtype != w.dtype and {features.dtype, w.dtype} & {torch.float16, torch.bfloat16}:
        dt = torch.promote_types(features.dtype, w.dtype)
        features, w = features.to(dt), w.to(dt)
    if features.dtype != w.dtype:
        raise TypeError(f"{fn}: features ({features.dtype}) and weight ({w.dtype}) must have the same dtype")
    return features, w


def cosine_logits(features: Tensor, weight: Tensor, *, layout: str = "in_out", eps: float = EPS) -> Tensor:
    """Cosine logits ``normalize(features, dim=1) @ normalize(W, dim=0)`` (``F.normalize`` eps semantics).

    Args:
        features: (N, D) float tensor (any strides; contiguous or a transposed view avoid a copy).
        weight: (D, C) (``layout="in_out"``, the official NormedLinear layout) or (C, D)
            (``layout="out_in"``, the ``nn.Linear`` layout).
        eps: the norm clamp (F.normalize's default 1e-12).

    Returns:
        (N, C) cosines, differentiable w.r.t. both inputs (gradients in each input's layout).
    """
    x, w = _prepare(features, weight, layout, eps, "cosine_logits")
    return _ops.callable_of(_COSINE_LOGITS)(x, w, float(eps))[0]


# ---------------------------------------------------------------------------------------------------
# Module
# ---------------------------------------------------------------------------------------------------
class NormedLinear(nn.Module):
    """Cosine classifier (LDAM-DRW / GCL / KPS ``NormedLinear``): ``forward(x) = cosine_logits(x, W)``.

    ``weight`` is ``(in_features, out_features)`` as in the official code (``layout="in_out"``, default),
    initialised ``uniform(-1, 1)`` then each column renormalised to unit length (the official
    ``renorm_(2, 1, 1e-5).mul_(1e5)``), no bias. ``layout="out_in"`` stores ``(out_features,
    in_features)`` rows instead (``nn.Linear``'s layout; the same random draw, transposed).

    ``load_state_dict`` accepts either layout for a non-square weight (a weight whose shape is the
    transpose of this module's is transposed on load); a square weight (in == out) is taken to be in
    this module's layout.
    """

    def __init__(self, in_features: int, out_features: int, layout: str = "in_out", eps: float = EPS,
                 device=None, dtype=None):
        super().__init__()
        _check_layout(layout)
        if in_features < 0 or out_features < 0:
            raise ValueError(f"in_features and out_features must be >= 0, got {in_features}, {out_features}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.layout = layout
        self.eps = float(eps)
        shape = (self.in_features, self.out_features) if layout == "in_out" else (self.out_features,
                                                                                    self.in_features)
        self.weight = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        w = torch.empty(self.in_features, self.out_features, device=self.weight.device, dtype=self.weight.dtype)
        w.uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5)
        self.weight.copy_(w if self.layout == "in_out" else w.t())

    def forward(self, x: Tensor) -> Tensor:
        return cosine_logits(x, self.weight, layout=self.layout, eps=self.eps)

    def weight_in_out(self) -> Tensor:
        """The weight as an (in, out) = (D, C) view."""
        return self.weight if self.layout == "in_out" else self.weight.t()

    def class_weight(self) -> Tensor:
        """Weights as (out, in) rows (one per class), for analysis (norms, τ-norm)."""
        return self.weight_in_out().t()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, layout={self.layout!r}"

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        w = state_dict.get(key)
        if isinstance(w, Tensor) and w.dim() == 2 and tuple(w.shape) != tuple(self.weight.shape) \
                and tuple(w.shape[::-1]) == tuple(self.weight.shape):
            state_dict[key] = w.t()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


# ---------------------------------------------------------------------------------------------------
# Head + loss in row chunks
# ---------------------------------------------------------------------------------------------------
def _reduction_of(call) -> tuple[str, Optional[Tensor]]:
    """How a loss's :class:`~ltkernels.reference.CrossEntropyCall` reduces its batch: ``"none"``, ``"sum"``,
    ``"batch"`` (sum / N: ``batch_mean`` and the focal 'mean' of the official code) or ``"mean"``, with this
    chunk's share of the (weighted) mean's denominator (None for the other kinds)."""
    kw = call.kwargs
    red = kw.get("reduction", "mean")
    focal = kw.get("focal_gamma") is not None
    if red in ("none", "sum"):
        return red, None
    if red == "batch_mean" or (red == "mean" and focal):
        return "batch", None
    if red != "mean":
        raise ValueError(f"cosine_head_loss: unsupported reduction {red!r}")
    input = call.input
    tgt = torch.as_tensor(call.target).to(device=input.device, dtype=torch.long)
    valid = tgt != int(kw.get("ignore_index", -100))
    w = kw.get("weight")
    if w is None:
        return "mean", valid.sum().to(_acc_dtype(input.dtype))  # a bf16 count is inexact above 256
    w = torch.as_tensor(w).to(device=input.device, dtype=_acc_dtype(input.dtype))
    if w.dim() == 0:
        w = w.expand(input.shape[1])
    return "mean", (w[torch.where(valid, tgt, torch.zeros_like(tgt))] * valid).sum()


def _call_chunk(loss: nn.Module, cos: Tensor, target: Tensor, noise: Optional[Tensor]):
    """loss(cos, target[, noise=noise]) with the module's reduction turned into a sum; returns
    (value, kind, denominator share).

    The module spells out its cross-entropy call (``loss.cross_entropy_call``: function, input, target and
    keyword arguments, reduction included); the chunk runs that call with ``reduction="sum"`` (or "none").
    Nothing on the module is patched or redirected, so threads may share one module."""
    spell = getattr(loss, "cross_entropy_call", None)
    if not callable(spell):
        raise TypeError("cosine_head_loss: `loss` must be a loss module of ltkernels.losses or ltkernels.reference "
                        f"(one with a `cross_entropy_call` method), got {type(loss).__name__}")
    call = spell(cos, target) if noise is None else spell(cos, target, noise=noise)
    kind, denom = _reduction_of(call)
    return call.run(reduction="none" if kind == "none" else "sum"), kind, denom


def _chunk_bounds(n: int, chunk: int):
    return [(r0, min(n, r0 + chunk)) for r0 in range(0, n, chunk)]


def _rng_state(device: torch.device, loss: nn.Module):
    """Every random-number state a loss may draw from: the global CPU generator (the reference's
    noise, the fused kernels' seeds), the device's, and the module's own ``generator`` if any."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    gen = getattr(loss, "generator", None)
    return torch.get_rng_state(), cuda, (gen.get_state() if isinstance(gen, torch.Generator) else None)


def _run_chunks(x, w, wn, target, noise, loss, chunk, eps, need_x, need_w, row_grad=None, rng=None):
    """One pass over the row chunks.

    Returns (sum or per-row losses, kind, denominator, x norms, rng states, (gx, x dots), (gw, w dots)).
    When gradients are wanted (need_x / need_w, and for per-row losses only with ``row_grad``), each
    chunk's logit gradient G becomes *prescaled* GEMM accumulations ``gx rows = (G / |x_i| / |w_j|) W^T`` and
    ``gw += x^T (G / |x_i| / |w_j|)``; the caller applies the tangent projections (and any scale).
    ``rng``: per-chunk random-number states to replay (the recomputation of reduction 'none').
    The tangent dot products come with the gradient: ``xd[i] = sum_j G_ij c_ij`` and
    ``wd[j] = sum_i G_ij c_ij`` (cosine_grad_prep_), so the projections need no extra pass."""
    n = x.shape[0]
    parts, denom, kind = [], None, None
    gx = gw = xd = wd = None
    acc = _acc_dtype(x.dtype)  # norms, dot products, the weight-gradient sum of 16-bit operands: fp32
    xn_all = torch.empty(n, dtype=acc, device=x.device)
    states = []
    cuda_devices = [x.device] if x.device.type == "cuda" else []
    for k, (r0, r1) in enumerate(_chunk_bounds(n, chunk)):
        xc = x[r0:r1]
        xnc = ops.cosine_norms(xc, 1)
        xn_all[r0:r1] = xnc
        cos = torch.mm(xc, w)
        ops.cosine_scale_(cos, xnc, wn, eps)
        tc = target[r0:r1]
        nc = noise[r0:r1] if noise is not None else None
        with torch.random.fork_rng(devices=cuda_devices, enabled=rng is not None):
            if rng is None:
                states.append(_rng_state(x.device, loss))
            else:
                torch.set_rng_state(rng[k][0])
                if rng[k][1] is not None:
                    torch.cuda.set_rng_state(rng[k][1], x.device)
                if rng[k][2] is not None:
                    loss.generator.set_state(rng[k][2])
            track = need_x or need_w
            with torch.set_grad_enabled(track):
                leaf = cos.detach().requires_grad_(track)
                val, kind_c, den_c = _call_chunk(loss, leaf, tc, nc)
        if kind is not None and kind_c != kind:
            raise RuntimeError("cosine_head_loss: the loss changed its reduction between chunks")
        kind = kind_c
        g = None
        if track and (kind != "none" or row_grad is not None):
            go = row_grad[r0:r1].to(val.dtype) if kind == "none" else None
            (g,) = torch.autograd.grad(val, leaf, grad_outputs=go)
        val = val.detach()
        del leaf
        if den_c is not None:
            denom = den_c if denom is None else denom + den_c
        parts.append(val)
        if g is not None:
            if not g.is_contiguous():
                g = g.contiguous()
            # G / |x_i| / |w_j| in place (g is ours), and the tangent dot products from G * c
            rdc, cdc = ops.cosine_grad_prep_(g, cos, xnc, wn, eps)
            if need_x:
                if gx is None:
                    gx = torch.empty_like(x, memory_format=torch.contiguous_format)
                    xd = torch.empty(n, dtype=acc, device=x.device)
                torch.mm(g, w.t(), out=gx[r0:r1])
                xd[r0:r1] = rdc
            if need_w:
                w_rows = not w.is_contiguous()  # (C, D) storage: accumulate G^T x into it
                if gw is None:  # the first chunk writes the buffer (no zero fill, no read-back)
                    gw = (torch.mm(g.t(), xc).t() if w_rows else torch.mm(xc.t(), g)).to(acc)
                    wd = cdc
                elif gw.dtype != x.dtype:  # 16-bit operands: the chunks' GEMMs are summed in fp32
                    gw.add_(torch.mm(g.t(), xc).t() if w_rows else torch.mm(xc.t(), g))
                    wd += cdc
                else:
                    if w_rows:
                        gw.t().addmm_(g.t(), xc)
                    else:
                        gw.addmm_(xc.t(), g)
                    wd += cdc
            del g
        del cos
    if gw is not None and gw.dtype != x.dtype:
        gw = gw.to(x.dtype)  # the tangent projection works on the operand's dtype (math in fp32)
    if kind == "none":
        total = torch.cat(parts)
    else:
        total = torch.stack(parts).sum()
    return total, kind, denom, xn_all, states, (gx, xd), (gw, wd)


def _finish(total, kind, denom, n):
    if kind == "mean":
        return total / denom
    if kind == "batch":
        return total / n
    return total


class _HeadLossFn(torch.autograd.Function):
    """Chunked head + loss. Scalar reductions: the gradients are accumulated during the forward (one pass,
    no recomputation) and projected and scaled by grad_output in the backward, in place. Reduction
    'none': the forward keeps only the losses and the random-number states of each chunk; the backward
    replays the chunks with the per-row grad_output."""

    @staticmethod
    def forward(ctx, x, w, target, noise, loss, chunk, eps):
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        wn = ops.cosine_norms(w, 0)  # (torch's column norms of a row-major matrix are ~6x slower)
        n = x.shape[0]
        total, kind, denom, xn, states, gx, gw = _run_chunks(x, w, wn, target, noise, loss, chunk, eps, need_x,
                                                             need_w)
        ctx.kind, ctx.chunk, ctx.eps, ctx.loss, ctx.n = kind, chunk, eps, loss, n
        ctx.done = False
        if kind == "none":
            ctx.states = states
            ctx.save_for_backward(x, w, wn, target, noise)
        else:
            ctx.save_for_backward(x, w, wn, xn, gx[0], gx[1], gw[0], gw[1], denom)
        return _finish(total, kind, denom, n)

    @staticmethod
    def backward(ctx, grad_out):
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if ctx.kind == "none":
            x, w, wn, target, noise = ctx.saved_tensors
            _, _, _, xn, _, (gx, xd), (gw, wd) = _run_chunks(x, w, wn, target, noise, ctx.loss, ctx.chunk, ctx.eps,
                                                             need_x, need_w, row_grad=grad_out, rng=ctx.states)
            scale = None
        else:
            if ctx.done:
                raise RuntimeError("cosine_head_loss: backward through the same chunked loss twice is not supported "
                                   "(its gradients are finished in place); recompute the loss instead")
            ctx.done = True
            x, w, wn, xn, gx, xd, gw, wd, denom = ctx.saved_tensors
            scale = grad_out.to(_acc_dtype(x.dtype))
            if ctx.kind == "mean":
                scale = scale / denom
            elif ctx.kind == "batch":
                scale = scale / ctx.n
        if need_x:
            ops.cosine_tangent_(gx, x, xn, ctx.eps, 1, True, scale, xd)
        if need_w:
            ops.cosine_tangent_(gw, w, wn, ctx.eps, 0, True, scale, wd)
        return gx, gw, None, None, None, None, None


def cosine_head_loss(features: Tensor, weight: Tensor, target: Tensor, loss: nn.Module, *,
                     noise: Optional[Tensor] = None, chunk_size: Optional[int] = None, layout: str = "in_out",
                     eps: float = EPS) -> Tensor:
    """``loss(cosine_logits(features, weight), target)`` without materialising the (N, C) logits.

    The batch is processed in chunks of ``chunk_size`` rows (default: about 8M logits per chunk): per
    chunk, the cosines (one GEMM + fused scaling), the loss and its logit gradient (through the loss
    module's own kernel, e.g. ``ltkernels.functional.margin_cross_entropy``), and two GEMMs accumulating
    the feature and weight gradients. Only one chunk of logits (and the loss's per-chunk buffers) exists at
    a time; the tangent projections are applied once at the end.

    Args:
        features: (N, D); weight: (D, C) (``layout="in_out"``) or (C, D) (``"out_in"``).
        target: (N,) class indices.
        loss: a loss module of :mod:`ltkernels.losses` or :mod:`ltkernels.reference` taking cosine input
            (LDAMLoss, KPSLoss, CosFaceLoss, GCLLoss, GCLAngLoss, ArcFaceLoss, CrossEntropyLoss, ...). Its
            reduction is honoured globally: a (weighted) mean divides the sum over all chunks by the
            global denominator (sum of the class weights of the non-ignored targets), 'batch_mean' and the
            focal mean by N, 'none' returns the (N,) per-row losses.
        noise: (N, C) raw GCL / GCLAng noise to inject (sliced per chunk); None lets the loss draw its own,
            a fresh draw per chunk, which is the same distribution as one draw for the whole batch.

    Returns:
        The loss (0-d, or (N,) for reduction 'none'), differentiable w.r.t. features and weight.

    Dtypes as :func:`cosine_logits`, except that float16 operands are computed in float32 (the chunks'
    prescaled gradient ``G / |x_i| / |w_j|`` does not fit float16's range for every norm); bfloat16 runs in
    bfloat16 with the weight gradient of the chunks summed in float32.

    Not traceable by ``torch.compile`` (the chunk loop runs the loss's autograd inside the forward).
    Backward may run once (use ``retain_graph`` with the unchunked path if you need more).
    """
    x, w = _prepare(features, weight, layout, eps, "cosine_head_loss")
    if x.dtype == torch.float16:
        # The chunks' backward GEMMs take G / |x_i| / |w_j|, which fp16's range does not hold for every norm
        # (cosine_logits takes the normalised-operand path instead); fp16 operands are computed in fp32 here.
        x, w = x.float(), w.float()
    if not isinstance(target, Tensor):
        raise TypeError(f"cosine_head_loss: target must be a tensor, got {type(target).__name__}")
    if target.dim() != 1 or target.shape[0] != x.shape[0]:
        raise ValueError(f"cosine_head_loss: target must have shape ({x.shape[0]},), got {tuple(target.shape)}")
    if target.device != x.device:
        raise ValueError(f"cosine_head_loss: target is on {target.device} but features are on {x.device}")
    n, c = x.shape[0], w.shape[1]
    if noise is not None:
        if not isinstance(noise, Tensor) or tuple(noise.shape) != (n, c):
            raise ValueError(f"cosine_head_loss: noise must be an ({n}, {c}) tensor, got "
                             f"{tuple(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__}")
    if chunk_size is None:
        chunk_size = max(1, CHUNK_ELEMENTS // max(c, 1))
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"cosine_head_loss: chunk_size must be a positive int, got {chunk_size!r}")
    if n == 0:  # nothing to chunk; the loss defines the empty reduction (e.g. NaN mean)
        return loss(cosine_logits(x, w, eps=eps), target) if noise is None else \
            loss(cosine_logits(x, w, eps=eps), target, noise=noise)
    if not x.is_contiguous() and not x.t().is_contiguous():
        x = x.contiguous()
    if not w.is_contiguous() and not w.t().is_contiguous():
        w = w.contiguous()
    chunk = min(int(chunk_size), n)
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
        return _HeadLossFn.apply(x, w, target, noise, loss, chunk, float(eps))
    with torch.no_grad():
        total, kind, denom, *_ = _run_chunks(x, w, ops.cosine_norms(w, 0), target, noise,
                                                     loss, chunk, float(eps), False, False)
    return _finish(total, kind, denom, n)
