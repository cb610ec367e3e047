"""BEVT: masked image modelling + masked video modelling with one shared Video Swin backbone.

Shape legend: B batch, T frames, D = T / 2 token-frames, h/w target grid (stage-3 resolution, 14x14
at 224), C4 = stage-4 width (1024 for Swin-B), C3 = C4 / 2, V codebook size.

Per stream (REFERENCE_BEVT.md section 1.3): stage-3 tokens (C3) and stage-4 tokens upsampled x2 in
space by a transposed conv (C4) are concatenated (C3 + C4) and projected to C4; the video stream then
upsamples x2 in time (8 -> 16 token-frames: one target per frame), and both apply the backbone's final
LayerNorm. A shared Linear(C4 -> V) head predicts the tokenizer id of every masked token.

loss = CE(video masked tokens) + image_loss_weight * CE(image masked tokens) in mode "bevt";
"bevt_v" (video only) and "bevt_i" (images only) build and train one stream.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from bevt.models.video_swin import VideoSwinTransformer
from bevt.ops.masked_ce import masked_ce

MODES = ("bevt", "bevt_i", "bevt_v")


@dataclass
class BEVTOutput:
    """Scalars of one step; 0-dim tensors on the device (read them only on log steps: a host sync)."""

    loss: torch.Tensor
    loss_video: torch.Tensor | None = None
    loss_image: torch.Tensor | None = None
    acc_video: torch.Tensor | None = None
    acc_image: torch.Tensor | None = None

    def scalars(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in vars(self).items() if v is not None}


class BEVT(nn.Module):
    """The pretraining model: backbone + fusion heads + shared LM head (the tokenizer is separate)."""

    def __init__(self, backbone: VideoSwinTransformer, vocab_size: int = 8192, mode: str = "bevt",
                 image_loss_weight: float = 1.0):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown BEVT mode {mode!r}; choose from {', '.join(MODES)}")
        if backbone.num_layers != 4:
            raise ValueError(f"BEVT fuses stages 3 and 4: the backbone needs 4 stages, has {backbone.num_layers}")
        if backbone.mask_token is None:
            raise ValueError("the BEVT backbone needs a mask token (create it with mask_token=True)")
        self.mode = mode
        self.backbone = backbone
        self.vocab_size = vocab_size
        self.image_loss_weight = image_loss_weight
        c4 = backbone.num_features
        c3 = c4 // 2
        self.temporal_scale = backbone.patch_size[0]
        if mode in ("bevt", "bevt_v"):
            if backbone.patch_embed is None:
                raise ValueError(f"mode {mode} needs the video stream (video_stream=True)")
            self.fpn_s = nn.ConvTranspose3d(c4, c4, kernel_size=(1, 2, 2), stride=(1, 2, 2))
            self.lm_down_st = nn.Linear(c3 + c4, c4)
            self.fpn_t = nn.ConvTranspose3d(c4, c4, kernel_size=(self.temporal_scale, 1, 1),
                                            stride=(self.temporal_scale, 1, 1))
        if mode in ("bevt", "bevt_i"):
            if backbone.patch_embed_2d is None:
                raise ValueError(f"mode {mode} needs the image stream (image_stream=True)")
            self.fpn = nn.ConvTranspose2d(c4, c4, kernel_size=2, stride=2)
            self.lm_down = nn.Linear(c3 + c4, c4)
        self.lm_head = nn.Linear(c4, vocab_size)
        for m in (getattr(self, "lm_down_st", None), getattr(self, "lm_down", None), self.lm_head):
            if m is not None:
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    @property
    def uses_video(self) -> bool:
        return self.mode in ("bevt", "bevt_v")

    @property
    def uses_images(self) -> bool:
        return self.mode in ("bevt", "bevt_i")

    @staticmethod
    def _fuse(x3: torch.Tensor, x4_up: torch.Tensor, proj: nn.Linear) -> torch.Tensor:
        # x3: (B, D, h, w, C3); x4_up: (B, C4, D, >=h, >=w). Odd stage-3 grids: crop the upsampled stage 4.
        D, h, w = x3.shape[1:4]
        x4_up = x4_up[:, :, :D, :h, :w].permute(0, 2, 3, 4, 1)
        return proj(torch.cat([x3, x4_up], dim=-1))

    def encode_video(self, video: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Clip (B, 3, T, H, W) + input mask (B, D, h, w) -> hidden states (B, T*h*w, C4), frame-major."""
        if video.shape[2] % self.temporal_scale:
            raise ValueError(f"clip length {video.shape[2]} must be a multiple of the temporal patch "
                             f"{self.temporal_scale}: targets are predicted per frame")
        outs = self.backbone.forward_stages(video, mask)
        x3, x4 = outs[-2], outs[-1]
        fused = self._fuse(x3, self.fpn_s(x4.permute(0, 4, 1, 2, 3)), self.lm_down_st)  # B, D, h, w, C4
        up = self.fpn_t(fused.permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1)  # B, T, h, w, C4
        return self.backbone.norm(up).flatten(1, 3)

    def encode_images(self, images: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Images (B, 3, H, W) + mask (B, h, w) -> hidden states (B, h*w, C4)."""
        outs = self.backbone.forward_stages(images, mask)
        x3, x4 = outs[-2], outs[-1]  # (B, 1, h, w, C3), (B, 1, h/2, w/2, C4)
        x4_up = self.fpn(x4[:, 0].permute(0, 3, 1, 2)).unsqueeze(2)  # B, C4, 1, h, w
        return self.backbone.norm(self._fuse(x3, x4_up, self.lm_down)).flatten(1, 3)

    def _stream_loss(self, hidden: torch.Tensor, target_mask: torch.Tensor, ids: torch.Tensor, what: str,
                     max_masked_per_sample: int | None):
        B = hidden.shape[0]
        if target_mask.shape[0] != B or ids.shape != target_mask.shape:
            raise ValueError(f"{what}: target mask {tuple(target_mask.shape)} and ids {tuple(ids.shape)} must "
                             f"both be (B={B}, ...)")
        if target_mask[0].numel() != hidden.shape[1]:
            raise ValueError(f"{what}: {hidden.shape[1]} predicted tokens per sample but the target mask has "
                             f"{target_mask[0].numel()} ({tuple(target_mask.shape[1:])}); check the tokenizer "
                             f"input size (it must give the stage-3 grid)")
        bound = None if max_masked_per_sample is None else B * max_masked_per_sample
        return masked_ce(hidden, target_mask.reshape(B, -1), self.lm_head.weight, self.lm_head.bias,
                         ids.reshape(B, -1), max_masked=bound)

    def forward(self, *, video: torch.Tensor | None = None, video_mask: torch.Tensor | None = None,
                video_target_mask: torch.Tensor | None = None, video_ids: torch.Tensor | None = None,
                images: torch.Tensor | None = None, image_mask: torch.Tensor | None = None,
                image_ids: torch.Tensor | None = None, video_max_masked: int | None = None,
                image_max_masked: int | None = None) -> BEVTOutput:
        """One pretraining forward.

        Args:
            video: (B, 3, T, H, W) normalized clip; video_mask: (B, T/2, h, w) bool input (tube) mask;
            video_target_mask: (B, T, h, w) bool; video_ids: (B, T, h, w) tokenizer ids.
            images: (B, 3, H, W); image_mask: (B, h, w) bool (input and target); image_ids: (B, h, w).
            video_max_masked / image_max_masked: upper bounds on the masked target tokens of one sample,
                when the masks come from a generator with known settings (``TubeSpec.max_masked_target``,
                ``BlockMaskSpec.max_masked``): the fused loss then works through fewer rows. More masked
                tokens than that give a NaN loss (see ``bevt.ops.masked_ce``).
        """
        out = BEVTOutput(loss=torch.zeros((), device=self.lm_head.weight.device))
        if self.uses_video:
            if video is None or video_mask is None or video_target_mask is None or video_ids is None:
                raise ValueError(f"mode {self.mode} needs video, video_mask, video_target_mask and video_ids")
            hv = self.encode_video(video, video_mask)
            out.loss_video, out.acc_video = self._stream_loss(hv, video_target_mask, video_ids, "video",
                                                              video_max_masked)
            out.loss = out.loss + out.loss_video
        if self.uses_images:
            if images is None or image_mask is None or image_ids is None:
                raise ValueError(f"mode {self.mode} needs images, image_mask and image_ids")
            hi = self.encode_images(images, image_mask)
            out.loss_image, out.acc_image = self._stream_loss(hi, image_mask, image_ids, "image", image_max_masked)
            out.loss = out.loss + self.image_loss_weight * out.loss_image
        return out


def create_bevt(backbone_name: str, *, mode: str = "bevt", vocab_size: int = 8192, image_loss_weight: float = 1.0,
                **backbone_kwargs) -> BEVT:
    """Build a BEVT pretraining model around a registered backbone (streams chosen by ``mode``)."""
    from bevt.models.registry import create_model

    if mode not in MODES:
        raise ValueError(f"unknown BEVT mode {mode!r}; choose from {', '.join(MODES)}")
    backbone = create_model(backbone_name, video_stream=mode in ("bevt", "bevt_v"),
                            image_stream=mode in ("bevt", "bevt_i"), mask_token=True, num_classes=0, **backbone_kwargs)
    return BEVT(backbone, vocab_size=vocab_size, mode=mode, image_loss_weight=image_loss_weight)
