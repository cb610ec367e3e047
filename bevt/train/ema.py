"""Exponential moving average of a model's parameters, with mmcv ``EMAHook`` semantics (official SSv2 recipe).

mmcv v1.3.x ``EMAHook(momentum=0.0002, interval=1, warm_up=100)``, as the official SSv2 fine-tuning uses it:

* ``momentum`` is the weight of the *new* value: ``ema = (1 - m) * ema + m * param``;
* ``m = min(momentum ** interval, (1 + it) / (warm_up + it))`` at runner iteration ``it`` (0-based), and
  the update runs when ``it % interval == 0``. With the defaults the warm-up term is never the smaller
  one ((1 + it) / (100 + it) >= 0.01 > 0.0002), so ``m`` is 0.0002 from the first iteration: the EMA
  starts at the initial (pretrained) weights and moves with a horizon of ~5000 iterations;
* only parameters are averaged (buffers are not), starting from their values when training starts;
* mmcv's runner iteration is a *micro-batch*: with gradient accumulation the hook runs once per micro-batch,
  seeing the same parameters until the optimizer steps. Here :meth:`ModelEMA.update` runs once per
  optimizer step and applies the ``updates_per_step`` (= accumulation steps) per-iteration momenta in one
  go, compounded exactly: ``ema = prod(1 - m_j) * ema + (1 - prod(1 - m_j)) * param``. The only
  difference from mmcv is which parameters the first ``updates_per_step - 1`` iterations see (mmcv: the
  ones before the first step; here: the ones after it).

mmcv swaps the EMA weights into the model after each training epoch (so evaluation uses them) and back
before the next; :meth:`ModelEMA.applied` is that swap as a context manager.

The EMA is a horizon of thousands of iterations: for runs of a few hundred steps use a larger momentum
(e.g. 0.01) or switch it off, else the averaged weights stay near the initial ones.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn


def _plain(model: nn.Module) -> nn.Module:
    from bevt.train.checkpoint import unwrap_model

    return unwrap_model(model)


class ModelEMA:
    """EMA of ``model``'s parameters (mmcv ``EMAHook`` semantics, see the module docstring).

    Args:
        model: the model (DDP / compiled wrappers are looked through); its current parameters start the EMA.
        momentum: weight of the new value per iteration (mmcv default 0.0002).
        warm_up: mmcv's warm-up: ``m = min(momentum, (1 + it) / (warm_up + it))``; 0: none (``m = momentum``).
        interval: update every ``interval`` iterations (mmcv raises the momentum to this power).
        updates_per_step: runner iterations per optimizer step (the gradient-accumulation steps).
    """

    def __init__(self, model: nn.Module, *, momentum: float = 0.0002, warm_up: int = 100, interval: int = 1,
                 updates_per_step: int = 1):
        if not 0 < momentum < 1:
            raise ValueError(f"EMA momentum must be in (0, 1), got {momentum}")
        if warm_up < 0 or interval < 1 or updates_per_step < 1:
            raise ValueError(f"EMA warm_up must be >= 0, interval and updates_per_step >= 1; got {warm_up}, "
                             f"{interval}, {updates_per_step}")
        self.momentum = momentum ** interval  # as mmcv
        self.warm_up, self.interval, self.updates_per_step = warm_up, interval, updates_per_step
        self.names = [n for n, _ in _plain(model).named_parameters()]
        self.shadow = {n: p.detach().clone() for n, p in _plain(model).named_parameters()}

    def iteration_momentum(self, it: int) -> float:
        """mmcv's momentum at runner iteration ``it`` (0 when the hook skips this iteration)."""
        if it % self.interval:
            return 0.0
        if self.warm_up == 0:  # no warm-up (mmcv would divide by zero at iteration 0)
            return self.momentum
        return min(self.momentum, (1 + it) / (self.warm_up + it))

    def step_weight(self, step: int) -> float:
        """Weight of the new parameters for optimizer step ``step``: ``1 - prod_j (1 - m_j)``."""
        keep = 1.0
        for j in range(self.updates_per_step):
            keep *= 1.0 - self.iteration_momentum(step * self.updates_per_step + j)
        return 1.0 - keep

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Fold the current parameters in, after optimizer step ``step`` (0-based). No host sync."""
        w = self.step_weight(step)
        if w == 0.0:
            return
        params = dict(_plain(model).named_parameters())
        ema = [self.shadow[n] for n in self.names]
        cur = [params[n].detach() for n in self.names]
        torch._foreach_lerp_(ema, cur, w)  # ema += w * (param - ema) == (1 - w) * ema + w * param

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite ``model``'s parameters with the averaged ones."""
        params = dict(_plain(model).named_parameters())
        for n in self.names:
            params[n].copy_(self.shadow[n])

    @contextlib.contextmanager
    def applied(self, model: nn.Module):
        """Use the EMA weights inside the block (mmcv's swap around evaluation), the live ones after it."""
        params = dict(_plain(model).named_parameters())
        live = {n: params[n].detach().clone() for n in self.names}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for n in self.names:
                    params[n].copy_(live[n])

    def state_dict(self) -> dict:
        """Plain tensors and numbers (saved in ``trainer.pt``; loadable with ``weights_only=True``)."""
        return {"momentum": self.momentum, "warm_up": self.warm_up, "interval": self.interval,
                "updates_per_step": self.updates_per_step,
                "shadow": {n: t.detach().to("cpu").clone() for n, t in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        shadow = state["shadow"]
        missing = [n for n in self.names if n not in shadow]
        if missing:
            raise ValueError(f"the EMA state has no value for {len(missing)} parameters, e.g. {missing[:3]}")
        for n in self.names:
            if shadow[n].shape != self.shadow[n].shape:
                raise ValueError(f"EMA state {n}: shape {tuple(shadow[n].shape)} != model {tuple(self.shadow[n].shape)}")
            self.shadow[n].copy_(shadow[n])
        self.momentum, self.warm_up = float(state["momentum"]), int(state["warm_up"])
        self.interval, self.updates_per_step = int(state["interval"]), int(state["updates_per_step"])


def ema_parameters(trainer_state: dict) -> dict[str, torch.Tensor] | None:
    """The averaged parameters stored in a checkpoint's ``trainer.pt`` state, or None if it has none."""
    ema = trainer_state.get("ema")
    return None if ema is None else dict(ema["shadow"])
