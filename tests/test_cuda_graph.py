"""``GraphedStep`` (``run.cuda_graph``): replayed forward and backward give what the eager module gives
(outputs, gradients, accumulation, optimizer steps), fresh randomness per replay, clear errors on misuse.

The replay tests need a CUDA GPU; the argument checks run anywhere.
"""
import copy

import pytest
import torch
import torch.nn as nn

from bevt.config import ConfigError, RunConfig
from bevt.train.cuda_graph import GraphedStep
from bevt.train.distributed import DistInfo
from bevt.train.job import check_cuda_graph, speed_hint

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")


class Head(nn.Module):
    """A small Swin step: Video Swin blocks, a loss and a non-differentiable metric. No head dropout: the
    comparisons with the eager module need the same numbers from both (DropPath is off unless asked)."""

    def __init__(self, drop_path: float = 0.0):
        super().__init__()
        from bevt.models import create_model

        self.model = create_model("videoswin_nano_patch244_window877", embed_dim=32, depths=(2, 2, 2, 2),
                                  num_heads=(1, 2, 4, 8), window_size=(2, 4, 4), num_classes=5, head_dropout=0.0,
                                  drop_path_rate=drop_path)

    def forward(self, x, y):
        logits = self.model(x)
        return {"loss": nn.functional.cross_entropy(logits.float(), y),
                "acc": (logits.detach().argmax(-1) == y).float().mean()}


def _batch(seed, n=2, device="cuda"):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(n, 3, 4, 64, 64, generator=g).to(device), torch.randint(0, 5, (n,), generator=g).to(device)


def _grads(module):
    return [p.grad.clone() for p in module.parameters() if p.grad is not None]


def test_refuses_cpu_inputs_and_inputs_that_need_grad():
    step = GraphedStep(Head())
    with pytest.raises(ValueError, match="CUDA device"):
        step(*_batch(0, device="cpu"))
    x = torch.randn(2, 3, device="cuda" if torch.cuda.is_available() else "cpu", requires_grad=True)
    with pytest.raises(ValueError, match="require grad|CUDA device"):
        step(x)
    with pytest.raises(ValueError, match="warm-up"):
        GraphedStep(Head(), warmup=0)


def test_config_check_names_the_setting():
    class Run:
        cuda_graph = True

    with pytest.raises(ConfigError, match="needs a CUDA device"):
        check_cuda_graph(Run, torch.device("cpu"))
    Run.cuda_graph = False
    check_cuda_graph(Run, torch.device("cpu"))  # off: nothing to check
    with pytest.raises(ConfigError, match="run.data_parallel=allreduce"):  # DDP's hooks cannot be replayed
        RunConfig(cuda_graph=True, data_parallel="ddp")
    with pytest.raises(ConfigError, match="run.data_parallel must be"):
        RunConfig(data_parallel="fsdp")


def test_speed_hint_on_cuda_only(capsys):
    gpu, main_rank, other_rank = torch.device("cuda", 0), DistInfo(), DistInfo(rank=1, world_size=2, local_rank=1)
    assert "run.cuda_graph=true" in speed_hint(RunConfig(), gpu, main_rank)
    assert "run.cuda_graph=true" in capsys.readouterr().err
    speed_hint(RunConfig(), gpu, other_rank)  # rank 0 alone says it
    assert capsys.readouterr().err == ""
    assert speed_hint(RunConfig(compile=True, cuda_graph=True), gpu, main_rank) is None
    assert speed_hint(RunConfig(), torch.device("cpu"), main_rank) is None


@cuda
@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_replay_matches_eager_over_optimizer_steps(amp):
    torch.manual_seed(0)
    eager = Head().cuda()
    graphed = copy.deepcopy(eager)
    step = GraphedStep(graphed, amp_dtype=amp)
    # SGD: an update linear in the gradient keeps the two runs' rounding differences at their size (Adam
    # would blow up the sign noise of near-zero gradients to lr-sized steps)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (eager, graphed)]
    tol = dict(rtol=1e-4, atol=1e-5) if amp is None else dict(rtol=2e-2, atol=2e-3)
    for i in range(4):  # new inputs every step; the optimizer updates the parameters the graph reads
        x, y = _batch(i)
        with torch.autocast("cuda", dtype=amp or torch.float32, enabled=amp is not None):
            want = eager(x, y)
        got = step(x, y)
        assert step.captured and set(got) == {"loss", "acc"} and not got["acc"].requires_grad
        torch.testing.assert_close(got["loss"], want["loss"], **tol, msg=lambda m: f"step {i}: {m}")
        torch.testing.assert_close(got["acc"], want["acc"])
        want["loss"].backward()
        got["loss"].backward()
        for g, w in zip(_grads(graphed), _grads(eager)):
            torch.testing.assert_close(g, w, **tol)
        for o in opts:
            o.step()
            o.zero_grad(set_to_none=True)
    assert step.eager_calls == 0


@cuda
def test_gradient_accumulation_and_kept_outputs():
    torch.manual_seed(0)
    eager = Head().cuda()
    graphed = copy.deepcopy(eager)
    step = GraphedStep(graphed)
    kept = []
    for i in range(2):  # two micro-batches into .grad, as the loop accumulates
        x, y = _batch(10 + i)
        eager(x, y)["loss"].backward()
        out = step(x, y)
        out["loss"].backward()
        kept.append(out["loss"].detach())
    for g, w in zip(_grads(graphed), _grads(eager)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    # each call's outputs are its own: the second replay did not overwrite the first call's loss
    assert kept[0].item() != kept[1].item()
    torch.testing.assert_close(kept[0], eager(*_batch(10))["loss"].detach(), rtol=1e-4, atol=1e-5)


@cuda
def test_other_shape_runs_eagerly_with_a_warning():
    torch.manual_seed(0)
    m = Head().cuda()
    step = GraphedStep(m)
    step(*_batch(0))["loss"].backward()
    x, y = _batch(1, n=3)
    with pytest.warns(UserWarning, match="another shape"):
        out = step(x, y)
    torch.testing.assert_close(out["loss"], m(x, y)["loss"])
    assert step.eager_calls == 1


@cuda
def test_backward_after_a_later_forward_raises():
    step = GraphedStep(Head().cuda())
    first = step(*_batch(0))
    second = step(*_batch(1))
    with pytest.raises(RuntimeError, match="replayed again"):
        first["loss"].backward()
    second["loss"].backward()  # the latest call's backward is fine


@cuda
def test_each_replay_draws_new_drop_path_randomness():
    torch.manual_seed(0)
    step = GraphedStep(Head(drop_path=0.5).cuda().train())
    x, y = _batch(0, n=8)
    losses = []
    for _ in range(4):
        out = step(x, y)
        out["loss"].backward()
        losses.append(out["loss"].item())
    assert len(set(losses)) > 1, losses  # the same batch, different dropped paths
