"""Backend choice for bevt's ops, in one place.

Every hot op (``bevt.ops.window_attention``, ``bevt.ops.masked_ce``, ``bevt.ops.masking``) takes
``backend=None | "ref" | "triton" | "cuda"``:

* ``None`` uses the global default for that op, which is "auto" unless set (``BEVT_KERNELS``, the
  ``kernels.*`` config fields, :func:`set_default_backend`). "auto" walks the op's priority list and
  takes the first backend whose ``can_run_<backend>(..., raise_error=False)`` passes; if none does,
  the error lists every backend and why it cannot run.
* An explicit name (argument or default) must run: its predicate is called with ``raise_error=True``
  and raises :class:`BackendUnavailable` naming each reason ("head dim must be 32 or 64, got 48").

The environment variable ``BEVT_KERNELS`` is parsed here and only here, when a default is first needed
(not at import: an invalid value then fails the op or run that uses it, with a message naming the variable,
and ``bevt info`` can still report it). Forms:
``auto`` | ``ref`` | ``triton`` (all ops that have it; others stay auto) |
``window_attention=triton,masked_ce=ref,masking=cuda``. Defaults set in the process (the config's
``kernels.*``, :func:`set_default_backend`) win over it for the ops they name.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

OPS = ("window_attention", "masked_ce", "masking")
BACKENDS = ("ref", "triton", "cuda")
AUTO = "auto"


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run the given inputs (the message says why)."""


@dataclass(frozen=True)
class Capabilities:
    """What a backend of one op accepts: data, not prose (printed by ``bevt info`` and used by tests)."""

    devices: tuple[str, ...]  # "cpu", "cuda"; "interpreter" = CPU tensors under TRITON_INTERPRET=1
    dtypes: tuple[torch.dtype, ...]
    min_compute_capability: tuple[int, int] | None = None
    notes: tuple[str, ...] = ()
    extra: dict = field(default_factory=dict)  # op-specific limits, e.g. {"head_dims": (32, 64)}


# ----------------------------------------------------------------------------- the global default
ENV_VAR = "BEVT_KERNELS"


def parse_kernel_setting(text: str | None, source: str = ENV_VAR) -> dict[str, str]:
    """Parse a ``BEVT_KERNELS``-style string into {op: backend-or-"auto"} for every op.

    ``source`` names where the string came from in the error (a ValueError that also lists the valid forms,
    ops and backends).
    """
    out = {op: AUTO for op in OPS}
    if text is None or not text.strip():
        return out
    setting = text.strip()
    if "=" not in setting:
        if setting != AUTO and setting not in BACKENDS:
            raise _setting_error(source, text, f"unknown backend {setting!r}")
        if setting in ("ref", AUTO):
            return {op: setting for op in OPS}
        for op in OPS:  # "triton": every op that has a triton backend; the rest stay auto
            if setting in _PRIORITY[op]:
                out[op] = setting
        return out
    for part in setting.split(","):
        if not part.strip():
            continue
        if "=" not in part:
            raise _setting_error(source, text, f"expected op=backend, got {part.strip()!r}")
        op, be = (s.strip() for s in part.split("=", 1))
        if op not in OPS:
            raise _setting_error(source, text, f"unknown op {op!r}")
        if be != AUTO and be not in _PRIORITY[op]:
            raise _setting_error(source, text, f"op {op} has no backend {be!r}")
        out[op] = be
    return out


def _setting_error(source: str, text: str, problem: str) -> ValueError:
    choices = "; ".join(f"{op}: {', '.join((AUTO,) + _PRIORITY[op])}" for op in OPS)
    return ValueError(f"{source}={text!r} is invalid: {problem}. Expected one of {AUTO}, {', '.join(BACKENDS)} "
                      f"(for every op that has it) or comma-separated op=backend pairs, e.g. "
                      f"window_attention=triton,masked_ce=ref (ops and their backends: {choices})")


def _check_backend_name(name: str, where: str) -> None:
    if name != AUTO and name not in BACKENDS:
        raise ValueError(f"{where}: unknown backend {name!r}; choose from auto, {', '.join(BACKENDS)}")


# fastest first; "ref" always last and always able to run
_PRIORITY: dict[str, tuple[str, ...]] = {
    "window_attention": ("triton", "ref"),
    "masked_ce": ("triton", "ref"),
    "masking": ("cuda", "ref"),
}

# Defaults set in this process (set_default_backend, use_backend, a config's kernels.*): they win over
# BEVT_KERNELS for the ops they name.
_overrides: dict[str, str] = {}
# BEVT_KERNELS, parsed at its first use and not at import: an invalid value must not stop ``import bevt`` (nor
# ``bevt info``, which reports it); it raises where a default is needed. None: not parsed yet.
_from_environment: dict[str, str] | None = None


def _environment_defaults() -> dict[str, str]:
    global _from_environment
    if _from_environment is None:
        _from_environment = parse_kernel_setting(os.environ.get(ENV_VAR), ENV_VAR)
    return _from_environment


def reload_environment_setting() -> None:
    """Forget the parsed ``BEVT_KERNELS``: the next use of a default reads the variable again (tests)."""
    global _from_environment
    _from_environment = None


def environment_setting_problem() -> str:
    """Why ``BEVT_KERNELS`` cannot be used (the error message), or "" when it can (``bevt info``)."""
    try:
        _environment_defaults()
    except ValueError as e:
        return str(e)
    return ""


def set_default_backend(backend: str | dict[str, str] | None, op: str | None = None) -> None:
    """Set the default backend of one op (``op=...``) or of all ops; ``None``/"auto" restores auto.

    A dict (as from ``kernels`` in the config) sets several ops at once. What is set here wins over
    ``BEVT_KERNELS`` (which is then not needed for those ops).
    """
    if isinstance(backend, dict):
        for k, v in backend.items():
            set_default_backend(v, op=k)
        return
    backend = AUTO if backend is None else backend
    if op is None:
        _overrides.update(parse_kernel_setting(backend, "default backend"))
        return
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; ops are {', '.join(OPS)}")
    _check_backend_name(backend, f"default backend of {op}")
    if backend != AUTO and backend not in _PRIORITY[op]:
        raise ValueError(f"op {op} has no backend {backend!r}; it has {', '.join(_PRIORITY[op])}")
    _overrides[op] = backend


def get_default_backend(op: str) -> str:
    """The default backend of ``op``: set in this process, else from ``BEVT_KERNELS``, else "auto".

    Raises ValueError naming ``BEVT_KERNELS`` when the default comes from it and it is invalid.
    """
    if op in _overrides:
        return _overrides[op]
    return _environment_defaults()[op]


@contextlib.contextmanager
def use_backend(backend: str | dict[str, str] | None, op: str | None = None) -> Iterator[None]:
    """Temporarily set default backends (tests, benchmarks, convergence checks)."""
    saved = dict(_overrides)
    try:
        set_default_backend(backend, op)
        yield
    finally:
        _overrides.clear()
        _overrides.update(saved)


def priority(op: str) -> tuple[str, ...]:
    return _PRIORITY[op]


# ----------------------------------------------------------------------------- choosing
Predicate = Callable[[bool], bool]  # predicate(raise_error) -> bool


# Non-zero while the predicate of an explicitly requested backend runs: only then may Triton kernels run
# on CPU tensors in the interpreter (auto never picks the interpreter: it is orders of magnitude slower).
# A plain module counter, not a ContextVar, so that torch.compile can trace the choice without a graph
# break; it only matters under TRITON_INTERPRET=1 (tests), where ops are not chosen from several threads.
_explicit_depth = 0


def choose(op: str, backend: str | None, predicates: dict[str, Predicate]) -> str:
    """Return the backend to run ``op`` with; see the module docstring for the rules."""
    # an explicit backend never reads the defaults (so it works whatever BEVT_KERNELS holds)
    requested = backend if backend is not None else get_default_backend(op)
    if requested != AUTO:
        if requested not in predicates:
            raise BackendUnavailable(
                f"{op}: unknown backend {requested!r}; this op has {', '.join(predicates)}")
        global _explicit_depth
        _explicit_depth += 1
        try:
            predicates[requested](True)
        finally:
            _explicit_depth -= 1
        return requested
    reasons = {}
    for name in _PRIORITY[op]:
        try:
            if predicates[name](True):
                return name
        except BackendUnavailable as e:
            reasons[name] = str(e)
    raise BackendUnavailable(f"{op}: no backend can run these inputs:\n" +
                             "\n".join(f"  {k}: {v}" for k, v in reasons.items()))


def verdict(op: str, backend: str, reasons: Sequence[str], raise_error: bool) -> bool:
    """Turn a list of reasons into the predicate's answer (raising them when asked to)."""
    reasons = [r for r in reasons if r]
    if reasons and raise_error:
        raise BackendUnavailable(f"{op}: backend '{backend}' cannot run: " + "; ".join(reasons))
    return not reasons


# ----------------------------------------------------------------------------- environment facts
@torch.compiler.assume_constant_result  # a fact of the process: torch.compile reads it, traces nothing
def triton_status() -> tuple[bool, str]:
    """Can Triton kernels run here at all? (ok, reason-if-not)."""
    return _triton_status()


@functools.lru_cache(maxsize=None)
def _triton_status() -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install 'triton>=3.2')"
    try:
        importlib.import_module("triton")
        importlib.import_module("triton.language")
    except Exception as e:  # a broken install says so instead of failing later
        return False, f"triton failed to import: {e!r}"
    if triton_interpreting():
        return True, "TRITON_INTERPRET=1: kernels run in Triton's CPU interpreter (slow; for tests)"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU visible (set TRITON_INTERPRET=1 to run Triton kernels in the CPU interpreter)"
    return True, ""


def _clear_status_caches() -> None:
    _triton_status.cache_clear()
    _kernel_module_facts_cached.cache_clear()


triton_status.cache_clear = _clear_status_caches  # tests change TRITON_INTERPRET


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_device_reasons(*tensors: torch.Tensor) -> list[str]:
    """Reasons why Triton cannot run on these tensors' device (empty list: it can)."""
    ok, why = triton_status()
    if not ok:
        return [why]
    reasons = []
    for t in tensors:
        if t.device.type == "cuda":
            continue
        if t.device.type == "cpu" and triton_interpreting():
            if _explicit_depth:
                continue
            reasons.append("CPU tensors run Triton kernels only in the interpreter, which auto never picks "
                           "(ask for backend='triton' explicitly)")
            break
        reasons.append(f"tensors must be on a CUDA device (got {t.device}; CPU tensors only under TRITON_INTERPRET=1)")
        break
    return reasons


def compute_capability_reasons(caps: Capabilities, dev: torch.device | None) -> list[str]:
    """Why a CUDA device is too old for a backend (empty list: it is not, or ``dev`` is no CUDA device)."""
    if dev is None or dev.type != "cuda" or caps.min_compute_capability is None:
        return []
    cc = torch.cuda.get_device_capability(dev)
    if cc < caps.min_compute_capability:
        return [f"needs compute capability >= {caps.min_compute_capability}, {dev} has {cc}"]
    return []


def triton_kernel_reasons(name: str, caps: Capabilities, *tensors: torch.Tensor) -> list[str]:
    """What every Triton op checks besides its own shape limits: the tensors' device (one device for all),
    its compute capability, that ``bevt.kernels.<name>`` imports, and, for CPU tensors under the interpreter,
    that triton was imported in interpreter mode."""
    reasons = triton_device_reasons(*tensors)
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        reasons.append("all tensors must be on one device, got " + ", ".join(sorted(map(str, devices))))
    reasons += compute_capability_reasons(caps, next((t.device for t in tensors if t.device.type == "cuda"), None))
    import_problem, interpreter_problem = _kernel_module_facts(name)
    if import_problem:
        reasons.append(import_problem)
    elif interpreter_problem and any(t.device.type == "cpu" for t in tensors):
        reasons.append(interpreter_problem)
    return reasons


def triton_kernel_status(name: str) -> tuple[bool, str]:
    """:func:`triton_status`, and whether ``bevt.kernels.<name>`` imports (for ``bevt info``)."""
    ok, why = triton_status()
    import_problem, _ = _kernel_module_facts(name)
    if ok and import_problem:
        return False, import_problem
    return ok, why


@torch.compiler.assume_constant_result  # facts of the process, like triton_status: compile reads, never traces
def _kernel_module_facts(name: str) -> tuple[str, str]:
    return _kernel_module_facts_cached(name)


@functools.lru_cache(maxsize=None)
def _kernel_module_facts_cached(name: str) -> tuple[str, str]:
    """Why ``bevt.kernels.<name>`` does not import, and why its kernels cannot take CPU tensors under the
    interpreter (each empty when it does / they can or the interpreter is off)."""
    try:
        module = importlib.import_module(f"bevt.kernels.{name}")
    except ImportError as e:
        return f"the Triton kernel module bevt.kernels.{name} does not import in this build ({e})", ""
    if triton_interpreting() and not module.interpreter_ready():
        return "", ("TRITON_INTERPRET=1 was set after triton was imported in compiled mode: set it before the "
                    "first import of triton to run the kernels on the CPU")
    return "", ""


EXTENSION_BUILD_COMMAND = "BEVT_BUILD_EXT=1 pip install --no-build-isolation -e ."


@torch.compiler.assume_constant_result
def cuda_extension_status() -> tuple[bool, str]:
    """Is the compiled CUDA extension ``bevt._C`` importable? (ok, reason-if-not)."""
    return _cuda_extension_status()


@functools.lru_cache(maxsize=None)
def _cuda_extension_status() -> tuple[bool, str]:
    try:
        importlib.import_module("bevt._C")
    except ImportError as e:
        if os.environ.get("BEVT_JIT_EXTENSION", "0") == "1":
            try:
                from bevt import _jit_extension

                _jit_extension.load()
                return True, "built just in time (BEVT_JIT_EXTENSION=1)"
            except Exception as je:  # noqa: BLE001 - the reason is reported, not swallowed
                return False, f"JIT build failed: {je}"
        return False, (f"the CUDA extension bevt._C is not built ({e.msg}); on a machine with a CUDA torch "
                       f"and nvcc run: {EXTENSION_BUILD_COMMAND}")
    if not torch.cuda.is_available():
        return False, "bevt._C is built but no CUDA GPU is visible"
    return True, ""
