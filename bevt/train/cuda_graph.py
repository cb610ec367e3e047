"""Replay a micro-step's forward and backward as two CUDA graphs (``run.cuda_graph``).

Why: on the fast path the BEVT step is host-bound. With the Swin blocks compiled, its GPU work at Swin-B
shapes is ~3x below the reference, but Python, the dispatcher and autograd spend more time *launching*
thousands of kernels per step than the GPU spends running them (benchmarks/RESULTS.md, the BEVT step). A
CUDA graph launches the whole forward, and the whole backward, with one call each.

:class:`GraphedStep` wraps a module whose ``forward(*tensors)`` returns a dict of tensors (the losses and
the metrics of one micro-batch). The first call warms it up eagerly and captures it; later calls copy the
inputs into the graph's static buffers, replay, and return the outputs as fresh tensors, with gradients
for the module's trainable parameters when the caller runs ``backward`` (the loop's own backward, scaler
and accumulation stay as they are).

What the step must allow, and what happens when it does not:

* fixed shapes, dtypes and devices: a call with another input signature (a smaller last batch) runs
  eagerly, with one warning;
* no host sync and no host-to-device copy of pageable memory inside the module (the fast path has none:
  masks and CE counts stay on the device); capture fails with CUDA's error otherwise;
* randomness from torch's CUDA generator (DropPath): each replay draws new numbers;
* one backward per forward, before the next forward: the graphs share their activation buffers, so a
  backward after a later forward raises instead of using the later call's activations;
* the module's mode and structure stay as captured (the graph cannot see Python-side changes); in-place
  updates of parameters (optimizer, ``load_state_dict``) are seen.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn


def _signature(args: tuple) -> tuple:
    return tuple((tuple(a.shape), a.dtype, a.device, a.requires_grad) if isinstance(a, torch.Tensor) else ("const", a)
                 for a in args)


@dataclass
class _Captured:
    signature: tuple
    params: list[nn.Parameter]  # the module's trainable parameters at capture: the backward graph's outputs
    static_inputs: list[torch.Tensor]
    keys: list[str]
    static_outputs: list[torch.Tensor]
    differentiable: list[bool]
    static_grad_outputs: list[torch.Tensor | None]
    static_grads: list[torch.Tensor | None]
    fwd: torch.cuda.CUDAGraph
    bwd: torch.cuda.CUDAGraph
    generation: int = 0


class _Replay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cap: _Captured, n_inputs: int, *tensors):
        for static, x in zip(cap.static_inputs, tensors[:n_inputs]):
            if static.data_ptr() != x.data_ptr():
                static.copy_(x, non_blocking=True)
        cap.fwd.replay()
        cap.generation += 1
        ctx.cap, ctx.generation, ctx.n_inputs = cap, cap.generation, n_inputs
        # copies: the caller may keep outputs (metrics) across the next replay, which rewrites the buffers
        outs = tuple(o.clone() for o in cap.static_outputs)
        ctx.mark_non_differentiable(*(o for o, d in zip(outs, cap.differentiable) if not d))
        return outs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        cap = ctx.cap
        if ctx.generation != cap.generation:
            raise RuntimeError("GraphedStep: backward of a forward that has been replayed again since; the graphs "
                               "share their activations, so run each call's backward before the next call")
        for static, g in zip(cap.static_grad_outputs, grads):
            if static is not None:
                static.copy_(g)
        cap.bwd.replay()
        # copies: autograd may keep a returned gradient as .grad, and the next replay rewrites the buffers
        # (with gradient accumulation, the second micro-batch would overwrite the first one's gradients)
        param_grads = tuple(None if g is None else g.clone() for g in cap.static_grads)
        return (None, None) + (None,) * ctx.n_inputs + param_grads


class GraphedStep:
    """``module(*args) -> dict[str, Tensor]``, replayed from CUDA graphs after the first call.

    Args:
        module: computes one micro-batch; its trainable parameters (``requires_grad``) get gradients.
        amp_dtype: autocast dtype inside the graph (None: no autocast). Autocast's weight-cast cache is
            off inside the graph (a cached cast would be freed after capture).
        warmup: eager forward+backward passes before capture (lazy initialisation, cuDNN autotuning and
            ``torch.compile`` must happen outside the capture). They do not touch ``.grad``.
    """

    def __init__(self, module: nn.Module, *, amp_dtype: torch.dtype | None = None, warmup: int = 3):
        if warmup < 1:
            raise ValueError(f"GraphedStep needs at least one warm-up pass before capture, got warmup={warmup}")
        self.module, self.amp_dtype, self.warmup = module, amp_dtype, warmup
        self._cap: _Captured | None = None
        self._warned = False
        self.eager_calls = 0  # calls that could not replay (another input signature)

    @property
    def captured(self) -> bool:
        return self._cap is not None

    def _autocast(self, device: torch.device):
        return torch.autocast(device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None,
                              cache_enabled=False)

    def _eager(self, args: tuple) -> dict[str, torch.Tensor]:
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        with self._autocast(device):
            out = self.module(*args)
        if not isinstance(out, dict) or not all(isinstance(v, torch.Tensor) for v in out.values()):
            raise TypeError(f"GraphedStep: the module must return a dict of tensors, got {type(out).__name__}")
        return out

    def __call__(self, *args) -> dict[str, torch.Tensor]:
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if not tensors:
            raise ValueError("GraphedStep: no tensor among the arguments")
        if any(t.device.type != "cuda" for t in tensors):
            raise ValueError("GraphedStep: CUDA graphs need every input on a CUDA device, got "
                             + ", ".join(sorted({str(t.device) for t in tensors})))
        if any(t.requires_grad for t in tensors):
            raise ValueError("GraphedStep: inputs that require grad are not supported (gradients flow to the "
                             "module's parameters only)")
        sig = _signature(args)
        if self._cap is None:
            self._cap = self._capture(args, sig)
        elif sig != self._cap.signature:
            if not self._warned:
                warnings.warn("GraphedStep: inputs of another shape or dtype than the captured step (e.g. a smaller "
                              "last batch); such calls run eagerly", stacklevel=2)
                self._warned = True
            self.eager_calls += 1
            return self._eager(args)
        cap = self._cap
        outs = _Replay.apply(cap, len(tensors), *tensors, *cap.params)
        return dict(zip(cap.keys, outs))

    def _capture(self, args: tuple, sig: tuple) -> _Captured:
        params = [p for p in self.module.parameters() if p.requires_grad]
        static_inputs = [a.detach().clone() for a in args if isinstance(a, torch.Tensor)]
        it = iter(static_inputs)
        static_args = tuple(next(it) if isinstance(a, torch.Tensor) else a for a in args)

        def grads_of(out: dict, grad_outputs=None):
            diff = [v for v in out.values() if v.requires_grad]
            if not diff:
                raise ValueError("GraphedStep: no output of the module requires grad (nothing to train)")
            if grad_outputs is None:
                grad_outputs = [torch.ones_like(v) for v in diff]
            return torch.autograd.grad(diff, params, grad_outputs=grad_outputs, allow_unused=True)

        # warm up on a side stream, as capture does (torch.cuda.graph's own recommendation)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                grads_of(self._eager(static_args))
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # the warm-up's cached blocks would sit beside the graphs' own pool

        pool = torch.cuda.graph_pool_handle()
        fwd, bwd = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        # thread_local: the loaders' threads (pinning, DALI) keep using CUDA while this thread captures
        with torch.cuda.graph(fwd, pool=pool, capture_error_mode="thread_local"):
            out = self._eager(static_args)
        keys = list(out)
        static_outputs = [out[k] for k in keys]
        differentiable = [o.requires_grad for o in static_outputs]
        static_grad_outputs = [torch.empty_like(o) if d else None for o, d in zip(static_outputs, differentiable)]
        with torch.cuda.graph(bwd, pool=pool, capture_error_mode="thread_local"):
            static_grads = list(grads_of(out, [g for g in static_grad_outputs if g is not None]))
        # the outputs as stored tensors, without the autograd graph of the capture
        static_outputs = [o.detach() for o in static_outputs]
        return _Captured(sig, params, static_inputs, keys, static_outputs, differentiable, static_grad_outputs, static_grads,
                         fwd, bwd)
