"""Named recipes: functions returning a full config. ``bevt pretrain --recipe NAME --set a.b=c``.

``default`` is the embedded run: synthetic data generated on first use, bevt's VQ tokenizer trained on
it, a nano Video Swin, a few minutes on a laptop CPU. The ``*_base_*`` recipes are the paper's settings
(REFERENCE_BEVT.md section 4.1); they need real data and, for the DALL-E tokenizer, OpenAI's encoder.pkl.
"""
from __future__ import annotations

from bevt.config import (DataConfig, MaskConfig, ModelConfig, OptimConfig, PretrainConfig, Recipes, RunConfig,
                         TokenizerConfig)

RECIPES = Recipes("pretraining")


@RECIPES
def default() -> PretrainConfig:
    """Embedded default: synthetic clips + images, built-in VQ tokenizer, nano model; minutes on a CPU."""
    return PretrainConfig(
        model=ModelConfig(name="videoswin_nano_patch244_window877", mode="bevt", drop_path_rate=0.05),
        tokenizer=TokenizerConfig(kind="vq", vocab_size=256, train_steps=150),
        data=DataConfig(root="data/synth", synthesize_if_missing=True, clip_len=8, frame_interval=4, crop_size=96,
                        scale_range=(104, 128), tok_size=48, video_batch=4, image_batch=8, num_workers=2),
        mask=MaskConfig(),
        optim=OptimConfig(lr=1e-3, weight_decay=0.05, epochs=8, warmup_epochs=1, clip_grad=3.0, accum_steps=1),
        run=RunConfig(out_dir="runs/default", log_every=5, keep_last=2),
    )


@RECIPES
def bevt_base_in1k_k400() -> PretrainConfig:
    """Paper: BEVT Swin-B on IN-1K + K400, 150 epochs, DALL-E tokenizer, 8 clips + 64 images per GPU per step."""
    return PretrainConfig(
        model=ModelConfig(name="videoswin_base_patch244_window877", mode="bevt", drop_path_rate=0.3),
        tokenizer=TokenizerConfig(kind="dalle", path="", vocab_size=8192, train_if_missing=False),
        data=DataConfig(root="", video_list="k400_train.txt", image_list="ILSVRC2012_name_train_list.txt",
                        clip_len=16, frame_interval=8, crop_size=224, scale_range=(256, 320), tok_size=112,
                        video_batch=8, image_batch=64, num_workers=8),
        optim=OptimConfig(lr=5e-4, weight_decay=0.05, betas=(0.9, 0.999), epochs=150, warmup_epochs=10,
                          clip_grad=3.0, accum_steps=2),
        run=RunConfig(out_dir="runs/bevt_base_in1k_k400", log_every=20, ckpt_every=2000, keep_last=3),
    )


@RECIPES
def bevt_v_base_k400() -> PretrainConfig:
    """Ablation: the video stream alone (BEVT-V), Swin-B on K400, otherwise as bevt_base_in1k_k400."""
    cfg = bevt_base_in1k_k400()
    cfg.model.mode = "bevt_v"
    cfg.run.out_dir = "runs/bevt_v_base_k400"
    return cfg


@RECIPES
def bevt_i_base_in1k() -> PretrainConfig:
    """Image stream alone (BEVT-I, stage 1 of the paper), Swin-B on IN-1K with the DALL-E tokenizer."""
    cfg = bevt_base_in1k_k400()
    cfg.model.mode = "bevt_i"
    cfg.optim.epochs = 800
    cfg.optim.warmup_epochs = 10
    cfg.run.out_dir = "runs/bevt_i_base_in1k"
    return cfg


@RECIPES
def bevt_tiny_k400() -> PretrainConfig:
    """Swin-T BEVT at the paper's data settings: a smaller model for one or a few GPUs."""
    cfg = bevt_base_in1k_k400()
    cfg.model.name = "videoswin_tiny_patch244_window877"
    cfg.model.drop_path_rate = 0.1
    cfg.run.out_dir = "runs/bevt_tiny_k400"
    return cfg
