"""Masked-token cross-entropy over the tokenizer's codebook, fused with the LM head.

BEVT predicts the tokenizer id of every *masked* token with a shared Linear(D -> V) head (V = 8192 for
DALL-E) and averages the cross-entropy over the masked tokens of a stream (no per-sample averaging, no
label smoothing), logging the masked-token accuracy beside it.

Shape legend: B batch, L tokens per sample, D hidden size, V codebook size, M masked tokens.

Rules (all backends):
* loss = sum of CE over masked tokens / max(M, 1); accuracy = correct argmax / max(M, 1).
* An empty mask gives loss 0 and accuracy 0 (never NaN) and zero gradients.
* The head runs in the hidden states' dtype, or the autocast dtype when autocast is on (fp32 hidden
  states are cast to it, as ``F.linear`` does); the softmax and the loss in fp32.
* Targets at masked positions must lie in [0, V); out-of-range targets raise on the reference path.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

from bevt.ops import backend as _be

OP = "masked_ce"


_NO_IGNORE = -(2 ** 62)  # an ignore_index no target can take


def masked_ce_ref(hidden: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: gather the masked rows, then linear + ``F.cross_entropy``. Returns (loss, accuracy).

    Boolean indexing makes this path wait for the GPU to count the masked tokens (a host sync).
    """
    h_MD = hidden[mask]
    t_M = target[mask].long()
    dtype = hidden.dtype
    logits_MV = F.linear(h_MD, weight.to(dtype), None if bias is None else bias.to(dtype)).float()
    count = t_M.numel()
    if count == 0:
        zero = (h_MD.sum() * 0.0 + weight.sum() * 0.0).float()  # keeps the graph: zero gradients, no NaN
        if bias is not None:
            zero = zero + bias.sum() * 0.0
        return zero, zero.detach()
    # no ignored class: F.cross_entropy's default ignore_index (-100) would drop such a target from the sum
    # while the mean still counts it; every masked target must be a codebook id
    loss = F.cross_entropy(logits_MV, t_M, reduction="sum", ignore_index=_NO_IGNORE) / count
    acc = (logits_MV.detach().argmax(-1) == t_M).float().sum() / count
    return loss, acc


CAPABILITIES = {
    "ref": _be.Capabilities(devices=("cpu", "cuda"), dtypes=(torch.float32, torch.float16, torch.bfloat16)),
    "triton": _be.Capabilities(
        devices=("cuda", "interpreter"), dtypes=(torch.float32, torch.float16, torch.bfloat16),
        min_compute_capability=(8, 0),
        notes=("no host sync: the masked count stays on the device",
               "gradients are computed in the forward (only when needed) and scaled by grad_output in the backward",
               "a second backward through the same graph is refused (saved gradients were scaled in place)"),
        extra={"max_hidden": 16384, "max_vocab": 1 << 20,
               "weight_dtypes": (torch.float32, torch.float16, torch.bfloat16),
               # relative error (norm) vs a float64 reference, as a multiple of the reference path's own error
               # in the same dtype, plus an absolute floor
               "tolerances": {"loss_ratio": 2.0, "grad_ratio": 3.0, "floor": {torch.float32: 1e-5,
                                                                             torch.float16: 2e-3,
                                                                             torch.bfloat16: 1e-2}}}),
}


def can_run_ref(*_, raise_error: bool = False, **__) -> bool:
    return True


def can_run_triton(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   mask: torch.Tensor | None = None, target: torch.Tensor | None = None, *,
                   raise_error: bool = False, **_) -> bool:
    caps = CAPABILITIES["triton"]
    tensors = [t for t in (hidden, weight, bias, mask, target) if t is not None]
    reasons = _be.triton_kernel_reasons("masked_ce", caps, *tensors)
    if hidden.dtype not in caps.dtypes:
        reasons.append(f"dtype must be one of {caps.dtypes}, got {hidden.dtype}")
    if weight.dtype not in caps.extra["weight_dtypes"] or (bias is not None and bias.dtype not in caps.extra["weight_dtypes"]):
        reasons.append(f"weight and bias dtypes must be one of {caps.extra['weight_dtypes']}, got {weight.dtype}"
                       + ("" if bias is None else f" and {bias.dtype}"))
    if hidden.shape[-1] > caps.extra["max_hidden"]:
        reasons.append(f"hidden size must be <= {caps.extra['max_hidden']}, got {hidden.shape[-1]}")
    if weight.shape[0] > caps.extra["max_vocab"]:
        reasons.append(f"codebook size must be <= {caps.extra['max_vocab']}, got {weight.shape[0]}")
    return _be.verdict(OP, "triton", reasons, raise_error)


def masked_ce(hidden: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
              target: torch.Tensor, *, max_masked: int | None = None,
              backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of the LM head over masked tokens, and the masked-token accuracy.

    Args:
        hidden: (B, L, D) hidden states of every token (or (L, D)).
        mask: (B, L) bool, True where a token was masked and must be predicted.
        weight: (V, D) LM head weight; bias: (V,) or None.
        target: (B, L) int tokenizer ids (only masked positions are read).
        max_masked: an upper bound on the number of masked tokens (all samples), when the caller knows one
            (e.g. from the mask generator's settings). The triton backend then works through that many rows
            instead of every token's worth; it cannot check the count without a host sync, so more masked
            tokens give a NaN loss and accuracy (and NaN hidden gradients). The ref backend raises instead.
        backend: None (default/auto), "ref" or "triton".
    Returns:
        (loss, accuracy): 0-dim fp32 tensors on hidden's device; only ``loss`` carries gradients.

    The triton backend never waits for the GPU (the masked count stays on the device); it computes the
    gradients during the forward when any input requires grad (scaled by grad_output in the backward) and
    does not support a second backward through the same graph. Targets outside [0, V) give a NaN loss there
    instead of an error (checking them would need a host sync).
    """
    if hidden.dim() not in (2, 3):
        raise ValueError(f"masked_ce: hidden must be (B, L, D) or (L, D), got {tuple(hidden.shape)}")
    if mask.shape != hidden.shape[:-1]:
        raise ValueError(f"masked_ce: mask shape {tuple(mask.shape)} does not match hidden {tuple(hidden.shape[:-1])}")
    if target.shape != mask.shape:
        raise ValueError(f"masked_ce: target shape {tuple(target.shape)} does not match mask {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        raise ValueError(f"masked_ce: mask must be bool, got {mask.dtype}")
    if not hidden.dtype.is_floating_point or not weight.dtype.is_floating_point or (
            bias is not None and not bias.dtype.is_floating_point):
        raise ValueError(f"masked_ce: hidden, weight and bias must be floating point, got {hidden.dtype}, "
                         f"{weight.dtype}" + ("" if bias is None else f" and {bias.dtype}"))
    if target.dtype not in (torch.int64, torch.int32, torch.int16):
        raise ValueError(f"masked_ce: target must be an integer tensor, got {target.dtype}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"masked_ce: weight must be (V, {hidden.shape[-1]}), got {tuple(weight.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"masked_ce: bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
    if max_masked is not None and (isinstance(max_masked, bool) or not isinstance(max_masked, int) or max_masked < 0):
        raise ValueError(f"masked_ce: max_masked must be a non-negative int or None, got {max_masked!r}")
    # Under autocast the head runs in the autocast dtype, as the reference's F.linear would by itself. The
    # custom op is not autocast-aware: cast here, or an fp32 hidden (the output of a LayerNorm under
    # autocast) would run the Triton GEMMs in fp32, about 10x slower (measured in the BEVT step).
    if hidden.dtype == torch.float32 and torch.is_autocast_enabled(hidden.device.type):
        hidden = hidden.to(torch.get_autocast_dtype(hidden.device.type))
    name = _be.choose(OP, backend, {
        "triton": lambda r: can_run_triton(hidden, weight, bias, mask, target, raise_error=r),
        "ref": lambda r: True,
    })
    if name == "triton":
        from bevt.kernels import masked_ce as kern

        return kern.masked_ce(hidden, mask, weight, bias, target, max_rows=-1 if max_masked is None else max_masked)
    if max_masked is not None:
        count = int(mask.sum())  # the reference syncs anyway (boolean indexing)
        if count > max_masked:
            raise ValueError(f"masked_ce: {count} tokens are masked, more than max_masked={max_masked}")
    return masked_ce_ref(hidden, mask, weight, bias, target)


def backend_status() -> dict[str, tuple[bool, str]]:
    return {"triton": _be.triton_kernel_status("masked_ce"), "ref": (True, "")}
