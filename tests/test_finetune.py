"""`bevt finetune`: the official recipes, layer-decay groups, EMA math, device augmentation, initialisation
from BEVT / BEVT-I pretraining checkpoints, exact resume, 2-process DDP, bad input."""
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from bevt.config import ConfigError
from bevt.data.augment import AugOp, RandAugment, RandomErasing, apply_ops
from bevt.train.ema import ModelEMA

PRE_TINY = [
    "data.crop_size=64", "data.scale_range=64,80", "data.tok_size=32", "data.clip_len=4", "data.frame_interval=4",
    "data.video_batch=2", "data.image_batch=2", "data.num_workers=0", "data.synthesize_if_missing=false",
    "tokenizer.vocab_size=32", "tokenizer.train_steps=5", "model.drop_path_rate=0.0", "run.progress=false",
    "run.tensorboard=false", "run.log_every=1", "optim.warmup_epochs=0", "optim.epochs=1", "optim.max_steps=1",
]
@pytest.fixture(scope="module")
def pretrained(synth_dataset, tmp_path_factory):
    """1-step BEVT and BEVT-I pretraining checkpoints (and their shared 5-step VQ tokenizer)."""
    from bevt.train.pretrain import build_config, pretrain

    root = tmp_path_factory.mktemp("pre")
    tok = str(root / "vq.safetensors")
    out = {}
    for mode in ("bevt", "bevt_i"):
        cfg = build_config("default", PRE_TINY + [f"data.root={synth_dataset.root}", f"tokenizer.path={tok}",
                                                  f"model.mode={mode}", f"run.out_dir={root / mode}"])
        out[mode] = pretrain(cfg)["checkpoint"]
    return out


# ---------------------------------------------------------------------------------------------------- recipes
def test_recipes_are_the_official_settings():
    """REFERENCE_BEVT.md sections 4.2 (K400) and 4.3 (SSv2), restated."""
    from bevt.train.finetune import RECIPES

    assert RECIPES.names() == ["default", "diving48", "k400", "ssv2"]
    k = RECIPES.get("k400")
    assert (k.model.name, k.model.drop_path_rate, k.model.head_dropout) == ("videoswin_base_patch244_window877", 0.3, 0.5)
    assert (k.data.clip_len, k.data.frame_interval, k.data.num_segments, k.data.flip) == (32, 2, 0, True)
    assert (k.data.short_side, k.data.crop_size, tuple(k.data.area_range)) == (256, 224, (0.08, 1.0))
    o = k.optim
    assert (o.lr, o.weight_decay, o.layer_decay, o.epochs, o.warmup_epochs, o.warmup_ratio) == (3e-4, 0.001, 0.9, 60, 2.5, 0.1)
    assert (o.schedule_by_epoch, o.clip_grad, k.data.batch_size, o.accum_steps) == (True, 40.0, 8, 4)
    assert (k.eval.test_clips, k.eval.test_crops, k.eval.test_short_side, k.eval.max_views) == (4, 3, 224, 4)
    assert not k.ema.enabled and k.label_smoothing == 0 and not k.aug.randaugment and k.aug.erasing_p == 0
    s = RECIPES.get("ssv2")
    assert (s.model.name, s.model.drop_path_rate, tuple(s.model.pretrained_window)) == \
        ("videoswin_base_patch244_window1677", 0.4, (8, 7, 7))
    assert (s.data.num_segments, s.data.flip, s.model.num_classes) == (32, False, 174)
    assert (s.aug.randaugment, s.aug.randaugment_n, s.aug.randaugment_m, s.aug.erasing_p) == (True, 4, 7, 0.25)
    o = s.optim
    assert (o.lr, o.weight_decay, o.backbone_lr_mult, o.layer_decay, o.clip_grad) == (5e-4, 0.05, 0.1, 1.0, 0.0)
    assert (s.data.batch_size, o.accum_steps, o.epochs, o.warmup_epochs, o.schedule_by_epoch) == (8, 8, 60, 2.5, True)
    assert (s.ema.enabled, s.ema.momentum, s.ema.warm_up, s.ema.interval) == (True, 0.0002, 100, 1)
    assert s.label_smoothing == 0.1 and (s.eval.test_clips, s.eval.test_crops, s.eval.max_views) == (1, 3, 2)
    d = RECIPES.get("diving48")
    assert d.model.num_classes == 48 and d.data.flip and d.aug == s.aug and d.optim == s.optim


# ---------------------------------------------------------------------------------------------------- optimizer
def _official_k400_keys(decay=0.9):
    """The official K400 fine-tuning custom_keys (swin_base_patch244_window877_bevt_finetune_k400.py), restated."""
    keys = {"backbone.norm": decay, "backbone.layers.3.blocks.1": decay, "backbone.layers.3.blocks.0": decay ** 2,
            "backbone.layers.2.downsample": decay ** 3}
    for j in range(18):
        keys[f"backbone.layers.2.blocks.{j}"] = decay ** (4 + 17 - j)
    keys.update({"backbone.layers.1.downsample": decay ** 22, "backbone.layers.1.blocks.1": decay ** 23,
                 "backbone.layers.1.blocks.0": decay ** 24, "backbone.layers.0.downsample": decay ** 25,
                 "backbone.layers.0.blocks.1": decay ** 26, "backbone.layers.0.blocks.0": decay ** 27,
                 "backbone.patch_embed": decay ** 28})
    return keys


def test_layer_decay_groups_match_official_k400():
    from bevt.models.registry import create_model
    from bevt.train.finetune import RECIPES, optimizer_groups

    cfg = RECIPES.get("k400")
    model = create_model(cfg.model.name, num_classes=400, drop_path_rate=0.0)
    groups = optimizer_groups(model, cfg.optim)
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    wd = {n: g["weight_decay"] for g in groups for n in g["names"]}
    assert set(scale) == {n for n, _ in model.named_parameters()}
    official = _official_k400_keys()
    by_len = sorted(official, key=len, reverse=True)  # mmcv: the longest matching key wins
    checked = 0
    for n in scale:
        full = "backbone." + n
        if n.startswith("head."):  # the official head (cls_head) matches no key: lr_mult 1
            assert scale[n] == 1.0 and wd[n] == 0.001
            continue
        key = next(k for k in by_len if k in full)
        assert math.isclose(scale[n], official[key], rel_tol=1e-9), (n, scale[n], official[key])
        checked += 1
    assert checked == len(scale) - 2
    # the named extremes of the official mapping
    assert math.isclose(scale["norm.weight"], 0.9) and math.isclose(scale["layers.3.blocks.1.mlp.fc1.weight"], 0.9)
    assert math.isclose(scale["layers.2.blocks.17.attn.qkv.weight"], 0.9 ** 4)
    assert math.isclose(scale["layers.2.blocks.0.attn.qkv.weight"], 0.9 ** 21)
    assert math.isclose(scale["patch_embed.proj.weight"], 0.9 ** 28)
    # no decay: norms and relative position tables; linear biases are decayed (official custom_keys)
    for n in wd:
        expect = 0.0 if ("norm" in n or "relative_position_bias_table" in n) else 0.001
        assert wd[n] == expect, n


def test_backbone_lr_mult_ssv2():
    from bevt.models.registry import create_model
    from bevt.train.finetune import RECIPES, optimizer_groups

    cfg = RECIPES.get("ssv2")
    model = create_model("videoswin_nano_patch244_window1677", num_classes=174)
    scale = {n: g["lr_scale"] for g in optimizer_groups(model, cfg.optim) for n in g["names"]}
    assert all(scale[n] == (1.0 if n.startswith("head.") else 0.1) for n in scale)


# ---------------------------------------------------------------------------------------------------- EMA
def test_ema_follows_mmcv_emahook():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    ema = ModelEMA(model, momentum=0.3, warm_up=4, interval=1, updates_per_step=1)
    expect = {n: v.clone() for n, v in start.items()}
    for step in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model, step)
        m = min(0.3, (1 + step) / (4 + step))  # mmcv: (1 + it) / (warm_up + it) until it reaches momentum
        for n, p in model.named_parameters():
            expect[n] = (1 - m) * expect[n] + m * p.detach()
    for n in expect:
        torch.testing.assert_close(ema.shadow[n], expect[n])
    # with accumulation, one update per optimizer step compounds the per-iteration momenta exactly
    acc = ModelEMA(torch.nn.Linear(4, 3), momentum=0.2, warm_up=3, updates_per_step=3)
    base = {n: v.clone() for n, v in acc.shadow.items()}
    target = torch.nn.Linear(4, 3)
    acc.update(target, 1)  # iterations 3, 4, 5
    for n, p in target.named_parameters():
        e = base[n]
        for it in (3, 4, 5):
            m = min(0.2, (1 + it) / (3 + it))
            e = (1 - m) * e + m * p.detach()
        torch.testing.assert_close(acc.shadow[n], e)
    # the official defaults: the warm-up never binds, m = 0.0002 from the first iteration
    assert ModelEMA(model).iteration_momentum(0) == 0.0002
    # applied(): EMA weights inside, live weights restored after; state round trip
    live = {n: p.detach().clone() for n, p in model.named_parameters()}
    with ema.applied(model):
        torch.testing.assert_close(model.weight.detach(), ema.shadow["weight"])
    torch.testing.assert_close(model.weight.detach(), live["weight"])
    other = ModelEMA(model)
    other.load_state_dict(ema.state_dict())
    torch.testing.assert_close(other.shadow["bias"], ema.shadow["bias"])
    assert other.momentum == 0.3 and other.warm_up == 4


# ---------------------------------------------------------------------------------------------------- augmentation
def _pil_ops_match():
    from PIL import Image, ImageOps

    rng = np.random.default_rng(0)
    img = (rng.random((40, 48, 3)) * 200 + 20).astype(np.uint8)
    img[5:20, 5:30] = 250
    pil = Image.fromarray(img)
    return img, {"equalize": ((), ImageOps.equalize(pil)), "autocontrast": ((), ImageOps.autocontrast(pil)),
                 "solarize": ((197,), ImageOps.solarize(pil, 197)), "posterize": ((7,), ImageOps.posterize(pil, 7)),
                 "invert": ((), ImageOps.invert(pil)),
                 "translate_x": ((0.077,), pil.transform(pil.size, Image.AFFINE, (1, 0, -0.077 * 48, 0, 1, 0),
                                                          fillcolor=128))}


def test_randaugment_ops_match_pil_and_are_clip_consistent():
    img, cases = _pil_ops_match()
    x = torch.from_numpy(img.copy()).permute(2, 0, 1)[None]
    for name, (value, ref) in cases.items():
        out = apply_ops(x, [AugOp(name, value)])[0].permute(1, 2, 0).numpy()
        assert np.array_equal(out, np.asarray(ref)), name
    # every operation treats all frames of a clip alike: per frame equals the whole clip
    g = torch.Generator().manual_seed(0)
    clip = torch.randint(0, 256, (3, 3, 40, 48), generator=g, dtype=torch.uint8)
    ra = RandAugment(4, 7)
    for seed in range(12):
        ops = ra.sample(np.random.default_rng(seed))
        whole = apply_ops(clip, ops)
        assert whole.dtype == torch.uint8 and whole.shape == clip.shape
        for t in range(3):
            assert torch.equal(whole[t:t + 1], apply_ops(clip[t:t + 1], ops)), (seed, ops)
    # n distinct operations (+ imgaug's initial flip / crop), magnitudes from m
    names = [[o.name for o in ra.sample(np.random.default_rng(s)) if o.name not in ("flip", "crop")] for s in range(50)]
    assert all(len(n) == 4 and len(set(n)) == 4 for n in names)
    assert any(o.name == "flip" for s in range(20) for o in ra.sample(np.random.default_rng(s)))
    rot = [o.value[0] for s in range(200) for o in ra.sample(np.random.default_rng(s)) if o.name == "rotate"]
    assert rot and all(abs(abs(v) - 7.0) < 1e-9 for v in rot)
    assert not any(o.name == "flip" for s in range(50)
                   for o in RandAugment(4, 7, initial_flip=False).sample(np.random.default_rng(s)))


def test_batch_augmentation_is_keyed_by_sample():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (3, 3, 4, 32, 32), generator=g, dtype=torch.uint8)
    ra = RandAugment(2, 9)
    a = ra(x, 0, 0, [5, 6, 7])
    b = ra(x[[2, 0, 1]], 0, 0, [7, 5, 6])  # another batch order: the same result per sample
    assert torch.equal(a, b[[1, 2, 0]])
    assert not torch.equal(ra(x, 0, 1, [5, 6, 7]), a)  # another epoch: other draws
    er = RandomErasing(p=1.0)
    z = er(torch.ones(3, 3, 4, 32, 32), 0, 0, [0, 1, 2])
    for b_ in range(3):
        erased = (z[b_] == 0).all(0)  # (T, H, W): channels erased together
        assert erased.any() and all(torch.equal(erased[0], erased[t]) for t in range(4))  # one box for all frames
        assert erased[0].float().mean() <= 1 / 3 + 0.02
    assert torch.equal(RandomErasing(p=0.0)(torch.ones(1, 3, 2, 8, 8), 0, 0, [0]), torch.ones(1, 3, 2, 8, 8))


# ---------------------------------------------------------------------------------------------------- initialisation
def test_init_from_bevt_checkpoint(pretrained, tiny_finetune, tmp_path):
    from safetensors.torch import load_file

    from bevt.train.finetune import build_classifier, finetune, load_init

    cfg = tiny_finetune(tmp_path / "run", f"model.init_from={pretrained['bevt']}")
    model = build_classifier(cfg, 8)
    notes = load_init(model, pretrained["bevt"])
    saved = load_file(os.path.join(pretrained["bevt"], "model.safetensors"))
    sd = model.state_dict()
    for k in ("patch_embed.proj.weight", "layers.2.blocks.1.attn.qkv.weight", "norm.weight",
              "layers.0.blocks.0.attn.relative_position_bias_table"):
        torch.testing.assert_close(sd[k], saved["backbone." + k])
    assert any("head: new" in n for n in notes)
    s = finetune(cfg)
    assert s["steps"] == 2 and s["init_from"].endswith(os.path.basename(pretrained["bevt"]))
    assert s["val_top1"] is not None and 0 <= s["val_top1"] <= 1


def test_init_from_bevt_i_image_checkpoint_is_inflated(pretrained, tiny_finetune, tmp_path):
    from safetensors.torch import load_file

    from bevt.train.finetune import build_classifier, finetune, load_init

    cfg = tiny_finetune(tmp_path / "run", f"model.init_from={os.path.dirname(os.path.dirname(pretrained['bevt_i']))}")
    model = build_classifier(cfg, 8)
    notes = load_init(model, pretrained["bevt_i"])
    assert any("BEVT-I" in n for n in notes)
    saved = load_file(os.path.join(pretrained["bevt_i"], "model.safetensors"))
    w2d = saved["backbone.patch_embed_2d.proj.weight"]
    torch.testing.assert_close(model.patch_embed.proj.weight.detach(), w2d.unsqueeze(2).repeat(1, 1, 2, 1, 1) / 2)
    t3 = saved["backbone.layers.1.blocks.0.attn.relative_position_bias_table"]  # (15 * 169, heads)
    t = model.layers[1].blocks[0].attn.relative_position_bias_table.detach().view(15, 169, -1)
    for dt in range(15):  # the trained dt = 0 slice, tiled over every temporal offset (official inflation)
        torch.testing.assert_close(t[dt], t3.view(15, 169, -1)[7])
    torch.testing.assert_close(model.layers[3].blocks[0].mlp.fc2.weight.detach(),
                               saved["backbone.layers.3.blocks.0.mlp.fc2.weight"])
    s = finetune(cfg)  # a run folder works as init_from too
    assert s["steps"] == 2 and any("BEVT-I" in n for n in s["init_notes"])


def test_resume_is_exact_with_augmentation_and_ema(tiny_finetune, tmp_path):
    from bevt.train.finetune import finetune

    aug = ["aug.randaugment=true", "aug.erasing_p=0.5", "label_smoothing=0.1", "ema.enabled=true", "ema.momentum=0.1",
           "optim.epochs=2", "eval.val_every=0"]

    def losses(run):
        with open(os.path.join(run, "metrics.jsonl")) as f:
            return [r["loss"] for r in map(json.loads, f) if "loss" in r]

    finetune(tiny_finetune(tmp_path / "full", *aug, "optim.max_steps=6"))
    finetune(tiny_finetune(tmp_path / "part", *aug, "optim.max_steps=3"))
    finetune(tiny_finetune(tmp_path / "part", *aug, "optim.max_steps=6"), resume="auto")
    assert losses(tmp_path / "full") == losses(tmp_path / "part")
    ema_full = torch.load(os.path.join(tmp_path / "full" / "checkpoints" / "step_00000006" / "trainer.pt"),
                          weights_only=True)["ema"]["shadow"]
    ema_part = torch.load(os.path.join(tmp_path / "part" / "checkpoints" / "step_00000006" / "trainer.pt"),
                          weights_only=True)["ema"]["shadow"]
    for k in ema_full:
        torch.testing.assert_close(ema_full[k], ema_part[k])


def test_a_signal_stops_finetuning_without_validation_and_resume_is_exact(tiny_finetune, tmp_path, monkeypatch):
    """SIGINT during step 2 of 4: the step finishes, a checkpoint is written, the validation that a run which
    ends mid-epoch would get is left to the resumed run, and that run ends where an unstopped one does."""
    import signal

    from bevt.train import finetune as job
    from bevt.train.checkpoint import read_model_weights

    extra = ("optim.max_steps=4", "optim.epochs=2", "ema.enabled=true", "ema.momentum=0.1")
    full = job.finetune(tiny_finetune(tmp_path / "full", *extra))
    step = job.FinetuneStep.__call__

    def signalled(self, batches, ctx):
        if ctx.step == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return step(self, batches, ctx)

    monkeypatch.setattr(job.FinetuneStep, "__call__", signalled)
    s = job.finetune(tiny_finetune(tmp_path / "part", *extra))
    assert (s["stopped_by"], s["steps"]) == ("SIGINT", 2) and s["checkpoint"].endswith("step_00000002")
    assert s["val_history"] == []
    monkeypatch.undo()
    r = job.finetune(tiny_finetune(tmp_path / "part", *extra), resume="auto")
    assert r["steps"] == 4 and r["stopped_by"] is None and r["val_history"]
    a, b = read_model_weights(full["checkpoint"]), read_model_weights(r["checkpoint"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert r["val_top1"] == full["val_top1"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_cuda_graph_run_matches_eager_run(tiny_finetune, tmp_path):
    """Fine-tuning replayed from CUDA graphs (augmentation outside the graph, EMA and a validation between
    the epochs, i.e. eval mode and back) gives the eager run's losses and validation accuracy."""
    from bevt.train.finetune import finetune

    common = ["run.device=cuda", "data.decoder=pyav", "model.head_dropout=0.0", "aug.randaugment=true",
              "ema.enabled=true", "optim.epochs=2", "optim.max_steps=8", "eval.val_every=1", "eval.val_batch_size=4"]

    def losses(run):
        with open(os.path.join(run, "metrics.jsonl")) as f:
            return [r["loss"] for r in map(json.loads, f) if "loss" in r]

    eager = finetune(tiny_finetune(tmp_path / "eager", *common))
    graphed = finetune(tiny_finetune(tmp_path / "graph", *common, "run.cuda_graph=true"))
    assert graphed["steps"] == eager["steps"] == 8
    assert losses(tmp_path / "graph") == pytest.approx(losses(tmp_path / "eager"), rel=1e-2, abs=1e-2)
    assert graphed["val_top1"] == pytest.approx(eager["val_top1"], abs=0.15)


@pytest.mark.parametrize("data_parallel,port", [("ddp", 29537), ("allreduce", 29538)])
def test_ddp_two_processes_match_one(tiny_finetune, tmp_path, data_parallel, port):
    """2 gloo processes x 2 clips == 1 process x 4 clips: the same samples, augmentation and losses (DDP,
    and the gradient all-reduce that run.cuda_graph uses under torchrun)."""
    from bevt.train.finetune import finetune

    common = ["optim.max_steps=3", "eval.val_every=0", "model.head_dropout=0.0", "aug.randaugment=true",
              "aug.erasing_p=0.5", "label_smoothing=0.1", "run.device=cpu"]  # gloo, also on a GPU machine

    def losses(run):
        with open(os.path.join(run, "metrics.jsonl")) as f:
            return [r["loss"] for r in map(json.loads, f) if "loss" in r]

    finetune(tiny_finetune(tmp_path / "one", *common))
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
            "-m", "bevt.cli", "finetune"]
    for ov in tiny_finetune.overrides + common + [f"run.out_dir={tmp_path / 'two'}", "data.batch_size=2",
                                                  f"run.data_parallel={data_parallel}"]:
        args += ["--set", ov]
    r = subprocess.run(args, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert abs(x - y) < 1e-4 * x, (a, b)


# ---------------------------------------------------------------------------------------------------- bad input
def test_bad_input_errors(synth_dataset, tiny_finetune, tmp_path, capsys):
    from bevt.cli import main
    from bevt.data.datasets import AnnotationError
    from bevt.train.finetune import build_config, finetune

    with pytest.raises(FileNotFoundError, match="model.init_from.*/no/such/ckpt"):
        finetune(tiny_finetune(tmp_path / "r1", "model.init_from=/no/such/ckpt"))
    with pytest.raises(ConfigError, match=r"model.num_classes=5 but the dataset has 8 classes"):
        finetune(tiny_finetune(tmp_path / "r2", "model.num_classes=5"))
    with pytest.raises(ConfigError, match="has label 7, but the model has 5 classes"):
        finetune(tiny_finetune(tmp_path / "r3", "model.num_classes=5", "data.class_names="))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(AnnotationError, match="no entries"):
        finetune(tiny_finetune(tmp_path / "r4", f"data.train_list={tmp_path / 'empty.txt'}"))
    with pytest.raises(FileNotFoundError, match="dataset not found"):
        finetune(tiny_finetune(tmp_path / "r5", f"data.root={tmp_path / 'nothing'}"))
    with pytest.raises(ValueError, match="unknown fine-tuning recipe 'k401'"):
        build_config("k401", [])
    with pytest.raises(ConfigError, match="test_clips=1"):
        build_config("ssv2", ["eval.test_clips=4"])
    with pytest.raises(ConfigError, match="ThreeCrop needs"):
        build_config("k400", ["eval.test_short_side=256"])
    with pytest.raises(ConfigError, match="has no field 'lrr'"):
        build_config("default", ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="data.short_side must be <= 2048, got 100000"):
        build_config("default", ["data.short_side=100000"])
    with pytest.raises(ConfigError, match="eval.test_short_side must be <= 2048"):
        build_config("default", ["eval.test_short_side=5000", "eval.test_crops=1"])
    with pytest.raises(ConfigError, match="data.crop_size must be a positive multiple of 32, got 0"):
        build_config("default", ["data.crop_size=0"])
    with pytest.raises(ConfigError, match="data.class_names: class-name file not found: .*nonexist.txt"):
        finetune(tiny_finetune(tmp_path / "r7", f"data.class_names={tmp_path / 'nonexist.txt'}"))
    with pytest.raises(ValueError, match="no tensor of this checkpoint matches"):
        from safetensors.torch import save_file

        save_file({"foo.weight": torch.zeros(2)}, str(tmp_path / "junk.safetensors"))
        finetune(tiny_finetune(tmp_path / "r6", f"model.init_from={tmp_path / 'junk.safetensors'}"))
    assert main(["finetune", "--recipe", "nope"]) == 2
    assert "unknown fine-tuning recipe" in capsys.readouterr().err
    assert main(["finetune", "--set", "optim.lr"]) == 2
    assert "section.field=value" in capsys.readouterr().err
    assert main(["finetune", "--set", f"data.root={synth_dataset.root}", "--set", "model.init_from=/no/such",
                 "--set", "model.init_optional=false", "--set", "run.progress=false"]) == 2
    assert re.search(r"checkpoint not found: /no/such", capsys.readouterr().err)


def test_overrides_suggest_the_field_strip_text_and_bound_sizes():
    """A mistyped field gets the closest one; a text value is taken without the spaces around it (as the key);
    numbers that would fork thousands of decoders or resize frames past 2048 px are refused."""
    from bevt.recipes import RECIPES as PRETRAIN
    from bevt.train.finetune import build_config

    with pytest.raises(ConfigError, match=r"optim has no field 'lrr'; did you mean optim.lr\?"):
        build_config("default", ["optim.lrr=1"])
    with pytest.raises(ConfigError, match=r"the config has no field 'optm'; did you mean optim\?"):
        PRETRAIN.build("default", ["optm.lr=1"])
    cfg = build_config("default", [" run.out_dir = runs/x ", "model.init_from= runs/pre"])
    assert cfg.run.out_dir == "runs/x" and cfg.model.init_from == "runs/pre" and not cfg.model.init_optional
    for build, bad, msg in ((build_config, "data.num_workers=100000", r"data.num_workers must be in \[0, 256\]"),
                            (PRETRAIN.build, "data.num_workers=100000", r"data.num_workers must be in \[0, 256\]"),
                            (PRETRAIN.build, "data.scale_range=128,30000", "data.scale_range must stay <= 2048"),
                            (PRETRAIN.build, "data.crop_size=0", "data.crop_size must be a positive multiple of 32")):
        with pytest.raises(ConfigError, match=msg):
            build("default", [bad])


def test_a_failed_validation_keeps_the_epoch_and_a_refused_resume_keeps_the_config(synth_dataset, tiny_finetune,
                                                                                    tmp_path, capsys):
    """Unreadable validation videos fail the run after its first epoch; that epoch's checkpoint is written
    first and named. A resume refused for another model leaves the run's config.json as the run wrote it."""
    from bevt.cli import main
    from bevt.train.finetune import finetune

    bad = tmp_path / "bad.mp4"
    bad.write_bytes(os.urandom(3000))
    val = tmp_path / "val_bad.txt"
    val.write_text("".join(f"{bad} {i}\n" for i in range(4)))
    run = tmp_path / "run"
    with pytest.raises(ValueError, match="could not be read"):
        finetune(tiny_finetune(run, f"data.val_list={val}", "optim.max_steps=0", "eval.val_every=1"))
    err = capsys.readouterr().err
    assert "the epoch's checkpoint is written" in err and "--resume auto" in err, err
    assert os.listdir(run / "checkpoints") == ["step_00000004"]  # 16 clips / batch 4: one epoch

    with open(run / "config.json") as f:
        before = f.read()
    args = ["finetune", "--resume", "auto"]
    for ov in tiny_finetune.overrides + [f"run.out_dir={run}", "model.name=videoswin_tiny_patch244_window877"]:
        args += ["--set", ov]
    assert main(args) == 2
    assert "its weights do not fit this run's model" in capsys.readouterr().err
    with open(run / "config.json") as f:
        assert f.read() == before

    # --resume of a pretraining run: said so, with the option that does what was meant
    from bevt.config import to_dict
    from bevt.models.bevt import create_bevt
    from bevt.recipes import RECIPES
    from bevt.train.checkpoint import save_checkpoint

    pre_cfg = RECIPES.get("default")
    pre = save_checkpoint(str(tmp_path / "pre"), 1, model=create_bevt(pre_cfg.model.name, vocab_size=16),
                          trainer_state={"world_size": 1}, config=to_dict(pre_cfg), keep_last=1)
    with pytest.raises(ValueError, match=r"it is a pretraining checkpoint, and this is a fine-tuning run.*"
                                         r"model.init_from="):
        finetune(tiny_finetune(tmp_path / "ft", "optim.max_steps=1"), resume=pre)


def test_an_init_checkpoint_named_by_hand_must_load(tmp_path):
    """The default recipe fine-tunes from scratch when its own pretraining run is absent, but a checkpoint
    named with --set model.init_from is meant: a mistyped path fails instead of training from scratch."""
    from bevt.train.finetune import build_config

    assert build_config("default", []).model.init_optional
    typo = str(tmp_path / "runs" / "defualt")
    cfg = build_config("default", [f"model.init_from={typo}", "data.num_workers=0"])
    assert not cfg.model.init_optional
    assert build_config("default", [f"model.init_from={typo}", "model.init_optional=true"]).model.init_optional
    # (that init_optional=false makes a missing checkpoint an error: test_bad_input_errors above)
