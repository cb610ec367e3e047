"""Shapes shared by benchmarks and tests: Video Swin-B BEVT pretraining, 8 clips of 16x224x224.

Patch 2x4x4 gives an 8x56x56 token grid; window 8x7x7 = 392 tokens; head dim 32.
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class AttentionShape:
    name: str
    batch: int  # clips
    grid: tuple[int, int, int]  # token grid (D, H, W) of the stage
    heads: int
    head_dim: int
    window: tuple[int, int, int]  # the table's window
    blocks: int  # blocks of this stage in Swin-B

    @property
    def windows(self) -> int:
        import math
        from bevt.models.video_swin import get_window_size

        ws = get_window_size(self.grid, self.window)
        return self.batch * math.prod(-(-g // w) for g, w in zip(self.grid, ws))


# Video Swin-B, 8 clips (PERFORMANCE.md): windows 512 / 128 / 32 / 8
SWIN_B_STAGES = [
    AttentionShape("stage1", 8, (8, 56, 56), 4, 32, (8, 7, 7), 2),
    AttentionShape("stage2", 8, (8, 28, 28), 8, 32, (8, 7, 7), 2),
    AttentionShape("stage3", 8, (8, 14, 14), 16, 32, (8, 7, 7), 18),
    AttentionShape("stage4", 8, (8, 7, 7), 32, 32, (8, 7, 7), 2),
]
# fine-tuning (K400 recipe: 8 clips of 32x224x224 per GPU): a 16x56x56 grid, so the temporal shift of 4 is live
SWIN_B_FINETUNE_STAGE1 = AttentionShape("ft_stage1", 8, (16, 56, 56), 4, 32, (8, 7, 7), 2)
# the image stream of the same model: 64 images of 224x224
SWIN_B_IMAGE_STAGES = [
    AttentionShape("img_stage1", 64, (1, 56, 56), 4, 32, (8, 7, 7), 2),
    AttentionShape("img_stage3", 64, (1, 14, 14), 16, 32, (8, 7, 7), 18),
]

# masked-token CE at the BEVT-B step shape: 8 clips x 784 masked tokens
CE_SHAPE = dict(rows=6272, hidden=1024, vocab=8192)

# masks per step: 64 clips + 64 images of a 14x14 grid, 8 tube slots
MASK_SHAPE = dict(clips=64, images=64, grid=(14, 14), slots=8)
