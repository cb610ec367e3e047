"""Launching Triton kernels with little host time, and running them in the interpreter on CPU tensors.

Shared by the kernels of this package. :class:`CachedKernel` keeps the compiled kernel per argument
specialization and calls its launcher directly on a repeated launch: Triton's own ``kernel[grid](...)``
binds and specializes every argument on every call (about 40 us for a kernel of 30 arguments, measured on
an H100 host), which a Swin step with ~250 Triton launches cannot afford.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
import triton
from triton.runtime.interpreter import InterpretedFunction

LAUNCH_OPTIONS = ("num_warps", "num_stages", "maxnreg")  # launch keywords that are not kernel parameters


class CachedKernel:
    """A @triton.jit kernel; CPU tensors run it in Triton's interpreter (TRITON_INTERPRET=1 set before
    triton was imported), CUDA tensors compile it.

    On CUDA, the compiled kernel is kept per argument specialization (every int's value, except the
    ``do_not_specialize`` ones, each tensor's dtype and 16-byte alignment, the constexprs and the launch
    options): a repeated launch goes straight to the compiled kernel's launcher, skipping Triton's per-call
    argument binding. Every parameter must be passed (positionally or by name). ``fn`` is a plain function
    (jitted here) or an already jitted kernel.
    """

    def __init__(self, fn, do_not_specialize=()):
        jitted = isinstance(fn, (triton.runtime.JITFunction, InterpretedFunction))
        self.fn = fn if jitted else triton.jit(fn, do_not_specialize=list(do_not_specialize))
        self.dns = set(do_not_specialize)
        self.names = [p.name for p in getattr(self.fn, "params", [])]
        self._compiled = {}
        self.cache_launches = True

    def _spec(self, name, v):
        if isinstance(v, torch.Tensor):
            return (v.dtype, v.data_ptr() % 16 == 0)
        if isinstance(v, bool) or v is None or isinstance(v, str):
            return v
        if isinstance(v, int):
            return ("i32" if -2 ** 31 <= v < 2 ** 31 else "i64") if name in self.dns else v
        if isinstance(v, float):
            return "fp32"
        if hasattr(v, "block_shape"):  # a host tensor descriptor
            return ("desc", v.base.dtype, v.base.data_ptr() % 16 == 0, tuple(v.shape), tuple(v.strides),
                    tuple(v.block_shape))
        return (type(v).__name__, repr(v))

    def __call__(self, grid, device: torch.device, *args, **kwargs):
        if device.type == "cpu":
            if not isinstance(self.fn, InterpretedFunction):
                raise RuntimeError(f"Triton kernel {getattr(self.fn, '__name__', '?')}: CPU tensors need Triton's "
                                   "interpreter: set TRITON_INTERPRET=1 before triton is first imported")
            for k in LAUNCH_OPTIONS:
                kwargs.pop(k, None)
            # (masked CE: stale rows of a chunk, poisoned with NaN on CPU, reach only rows that are never stored)
            with interpreter_scalar_index(), np.errstate(all="ignore"):
                return self.fn[grid](*args, **kwargs)
        vals = list(args) + [kwargs[n] for n in self.names[len(args):]]
        key = (tuple(kwargs.get(k) for k in LAUNCH_OPTIONS), device.index,
               tuple(self._spec(n, v) for n, v in zip(self.names, vals)))
        k = self._compiled.get(key)
        if k is not None:
            try:
                return k[tuple(grid) + (1,) * (3 - len(grid))](*vals)  # a compiled kernel's launcher takes 3 dims
            except (TypeError, ValueError, AttributeError, IndexError):  # a Triton whose launcher differs: use its own path
                self._compiled.clear()
                self.cache_launches = False
        k = self.fn[grid](*args, **kwargs)
        if self.cache_launches and k is not None and hasattr(k, "__getitem__"):
            self._compiled[key] = k
        return k


@contextlib.contextmanager
def interpreter_scalar_index():
    """Triton 3.6's interpreter turns a scalar into a Python int with ``int(array_of_shape_1)``, which
    numpy >= 2.4 rejects (loops with run-time bounds then fail). For the duration of one launch, the
    interpreter's tensor patch also installs an ``__index__`` that reads the single element."""
    from triton.runtime import interpreter as _ti

    orig = _ti._patch_lang_tensor

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _ti._patch_lang_tensor = patched
    try:
        yield
    finally:
        _ti._patch_lang_tensor = orig
