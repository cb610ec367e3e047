"""bevt's hot ops. Each takes ``backend=None|"ref"|"triton"|"cuda"`` (see :mod:`bevt.ops.backend`)."""
from bevt.ops.backend import BackendUnavailable, get_default_backend, set_default_backend, use_backend
from bevt.ops.masked_ce import masked_ce, masked_ce_ref
from bevt.ops.masking import (BlockMaskSpec, TubeSpec, block_masks, block_masks_ref, step_masks, tube_masks,
                              tube_masks_ref)
from bevt.ops.window_attention import (window_attention, window_attention_ref, window_attention_tokens,
                                       window_attention_tokens_ref)

__all__ = [
    "BackendUnavailable", "get_default_backend", "set_default_backend", "use_backend",
    "masked_ce", "masked_ce_ref",
    "BlockMaskSpec", "TubeSpec", "block_masks", "block_masks_ref", "step_masks", "tube_masks", "tube_masks_ref",
    "window_attention", "window_attention_ref", "window_attention_tokens", "window_attention_tokens_ref",
]
