"""``compile_blocks``: every Swin block compiles without a graph break, blocks of one geometry share their
compiled code (whatever their drop-path rate), and the compiled model computes what the eager one does.

Runs on the reference ops with the ``aot_eager`` backend (tracing and autograd, no code generation), so it
needs no compiler and no GPU; the Triton op's own tracing is tested in test_window_attention_triton.py.
"""
import copy

import pytest
import torch
import torch._dynamo

from bevt.models import compile_blocks, create_model
from bevt.models.video_swin import DropPath
from bevt.ops import use_backend


def _nano(**kw):
    return create_model("videoswin_nano_patch244_window877", embed_dim=16, depths=(2, 4, 2, 2), num_heads=(1, 2, 2, 4),
                        window_size=(2, 4, 4), image_stream=True, **kw)


def test_compiled_blocks_match_eager_and_share_graphs():
    torch.manual_seed(0)
    model = _nano(drop_path_rate=0.3).eval()
    eager = copy.deepcopy(model)
    torch._dynamo.reset()
    n = compile_blocks(model, backend="aot_eager", fullgraph=True)  # fullgraph: a graph break would raise
    assert n == 10 + 3  # 10 blocks + 3 patch mergings
    clip, images = torch.randn(1, 3, 4, 32, 32), torch.randn(2, 3, 32, 32)
    with use_backend("ref"), torch._dynamo.config.patch(error_on_recompile=False):
        torch._dynamo.utils.counters.clear()
        for x in (clip, images):
            got = model.forward_stages(x)
            want = eager.forward_stages(x)
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    # Graphs follow geometries (stream, stage, shift, drop path on/off) and merging inputs, not blocks: 11
    # per stream here. A graph per block (a float drop-path rate baked into each) would give 13 per stream.
    assert graphs <= 22, graphs
    torch._dynamo.reset()


def test_compiled_blocks_train_with_drop_path():
    torch.manual_seed(0)
    model = _nano(drop_path_rate=0.5).train()
    compile_blocks(model, backend="aot_eager", fullgraph=True)
    with use_backend("ref"):
        out = model(torch.randn(2, 3, 4, 32, 32))
        out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad
               and p.grad is not None)
    assert model.patch_embed.proj.weight.grad is not None
    torch._dynamo.reset()


def test_drop_path_keeps_or_drops_whole_samples_and_rescales():
    torch.manual_seed(0)
    dp = DropPath(0.25).train()
    x = torch.ones(4000, 3, 2, dtype=torch.bfloat16)
    y = dp(x)
    assert y.dtype == x.dtype
    per_sample = y.float().flatten(1)
    kept = per_sample[:, 0] > 0
    assert torch.all(per_sample[kept] == torch.tensor(1 / 0.75).bfloat16().float())  # one rounding of 1/keep
    assert torch.all(per_sample[~kept] == 0)
    assert abs(kept.float().mean().item() - 0.75) < 0.03
    assert torch.equal(dp.eval()(x), x)
    with pytest.raises(ValueError, match="drop path rate"):
        DropPath(1.0)
