"""Backbone and BEVT model: shapes, streams, checkpointing, inflation, a learning step, errors."""
import pytest
import torch

from bevt.models import create_bevt, create_model, list_models
from bevt.models.inflate import adapt_state_dict
from bevt.models.video_swin import VideoSwinTransformer
from bevt.ops import BlockMaskSpec, TubeSpec, block_masks, tube_masks

NANO = "videoswin_nano_patch244_window877"


@pytest.mark.parametrize("size,dims", [("tiny", (96, 768)), ("small", (96, 768)), ("base", (128, 1024))])
def test_backbone_stage_shapes_both_streams(size, dims):
    m = create_model(f"videoswin_{size}_patch244_window877", image_stream=True, drop_path_rate=0.0).eval()
    with torch.no_grad():
        outs = m.forward_stages(torch.randn(1, 3, 4, 64, 64))
        assert [tuple(o.shape) for o in outs] == [(1, 2, 16, 16, dims[0]), (1, 2, 8, 8, 2 * dims[0]),
                                                  (1, 2, 4, 4, 4 * dims[0]), (1, 2, 2, 2, dims[1])]
        outs = m.forward_stages(torch.randn(2, 3, 64, 64))
        assert [tuple(o.shape) for o in outs][-1] == (2, 1, 2, 2, dims[1])


def test_registry_and_window1677():
    assert {"videoswin_base_patch244_window877", "videoswin_base_patch244_window1677"} <= set(list_models())
    m = create_model("videoswin_tiny_patch244_window1677", num_classes=174)
    assert m.window_size == (16, 7, 7)
    assert m.layers[0].blocks[0].attn.relative_position_bias_table.shape == (31 * 13 * 13, 3)
    assert m(torch.randn(1, 3, 4, 64, 64)).shape == (1, 174)
    with pytest.raises(ValueError, match="did you mean"):
        create_model("videoswin_bse_patch244_window877")


def test_official_bevt_base_shapes_and_sizes():
    model = create_bevt("videoswin_base_patch244_window877").eval()
    n = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(n - 109.7) < 0.1  # 101.3 M backbone + fusion heads and 8.4 M LM head (official)
    assert abs(sum(p.numel() for p in model.backbone.layers.parameters()) / 1e6 - 87.6) < 0.05
    with torch.no_grad():
        assert model.encode_video(torch.randn(1, 3, 16, 224, 224), None).shape == (1, 3136, 1024)
        assert model.encode_images(torch.randn(2, 3, 224, 224), None).shape == (2, 196, 1024)


def _batch(B=2, Bi=3, T=8, S=96, vocab=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    grid = (S // 16, S // 16)
    spec = BlockMaskSpec.for_grid(grid)
    vi, vt = tube_masks(B, spec, TubeSpec(slots=T // 2), seed=seed)
    im = block_masks(Bi, spec, seed=seed)
    return dict(video=torch.randn(B, 3, T, S, S, generator=g), video_mask=vi, video_target_mask=vt,
                video_ids=torch.randint(0, vocab, (B, T, *grid), generator=g),
                images=torch.randn(Bi, 3, S, S, generator=g), image_mask=im,
                image_ids=torch.randint(0, vocab, (Bi, *grid), generator=g))


@pytest.mark.parametrize("quirks", [False, True])
def test_gradient_checkpointing_is_exact_for_both_streams(quirks):
    torch.manual_seed(0)
    a = create_bevt(NANO, vocab_size=64, drop_path_rate=0.2, image_quirks=quirks)
    b = create_bevt(NANO, vocab_size=64, drop_path_rate=0.2, image_quirks=quirks, grad_checkpointing=True)
    b.load_state_dict(a.state_dict())
    batch = _batch()
    torch.manual_seed(1)
    la = a(**batch).loss
    la.backward()
    torch.manual_seed(1)
    lb = b(**batch).loss
    lb.backward()
    assert torch.equal(la, lb)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-5, atol=1e-7, msg=n)


def test_mask_token_substitution_at_patch_grid():
    m = create_model(NANO, mask_token=True, image_stream=True)
    x = torch.randn(1, 3, 4, 64, 64)
    mask = torch.zeros(1, 2, 4, 4, dtype=torch.bool)
    mask[0, 1, 2, 3] = True  # one cell of the 4x4 mask grid = 4x4 patch tokens of token-frame 1
    tok = m.embed(x, mask)
    plain = m.embed(x)
    diff = (tok != plain).any(-1)[0]  # D, H, W
    assert diff.sum() == 16 and diff[1, 8:12, 12:16].all()
    torch.testing.assert_close(tok[0, 1, 8, 12], m.mask_token[0, 0])


def test_bevt_modes_build_only_their_streams():
    v = create_bevt(NANO, mode="bevt_v", vocab_size=64)
    i = create_bevt(NANO, mode="bevt_i", vocab_size=64)
    assert v.backbone.patch_embed_2d is None and not hasattr(v, "fpn")
    assert i.backbone.patch_embed is None and not hasattr(i, "fpn_s")
    batch = _batch()
    assert v(**batch).loss_image is None and i(**batch).loss_video is None
    with pytest.raises(ValueError, match="mode"):
        create_bevt(NANO, mode="bevt_x")


def test_bevt_loss_decreases_on_fixed_batch():
    torch.manual_seed(0)
    model = create_bevt(NANO, vocab_size=64, drop_path_rate=0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    batch = _batch(B=1, Bi=2, vocab=64)
    losses = []
    for _ in range(20):
        out = model(**batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.6 * losses[0], losses
    assert out.acc_video.item() > 0.2


def test_bevt_input_errors():
    model = create_bevt(NANO, vocab_size=64)
    batch = _batch()
    with pytest.raises(ValueError, match="multiple of the temporal patch"):
        model.encode_video(torch.randn(1, 3, 7, 96, 96), None)
    bad = dict(batch, video_ids=batch["video_ids"][:, :4])
    with pytest.raises(ValueError, match="target mask"):
        model(**bad)
    bad = dict(batch, video_target_mask=batch["video_target_mask"][:, :, :3, :3], video_ids=batch["video_ids"][:, :, :3, :3])
    with pytest.raises(ValueError, match="tokenizer input size"):
        model(**bad)
    with pytest.raises(ValueError, match="needs video"):
        model(images=batch["images"], image_mask=batch["image_mask"], image_ids=batch["image_ids"])
    with pytest.raises(ValueError, match="expected a clip"):
        model.backbone.embed(torch.randn(3, 96, 96))


def _image_swin_ckpt(window=7, embed=32):
    """A 2D Swin image checkpoint in the common format (Conv2d patch embed, 2D tables)."""
    torch.manual_seed(3)
    m2 = create_model(NANO, video_stream=False, image_stream=True)
    sd = {}
    for k, v in m2.state_dict().items():
        if k.startswith("patch_embed_2d."):
            sd["patch_embed." + k[len("patch_embed_2d."):]] = v
        elif k.endswith("relative_position_bias_table"):
            sd[k] = torch.randn((2 * window - 1) ** 2, v.shape[1])
        else:
            sd[k] = v
    return {"model": {"module." + k: v for k, v in sd.items()}}, m2


def test_inflation_2d_to_3d():
    ckpt, _ = _image_swin_ckpt()
    target = create_model(NANO, image_stream=True)
    sd, notes = adapt_state_dict(ckpt, target)
    missing, unexpected = target.load_state_dict(sd, strict=False)
    assert not unexpected and not [k for k in missing if "relative_position_index" not in k]
    t2 = ckpt["model"]["module.layers.0.blocks.0.attn.relative_position_bias_table"]
    t3 = target.layers[0].blocks[0].attn.relative_position_bias_table.detach()
    assert t3.shape == (15 * 169, t2.shape[1])
    for dt in range(15):  # every temporal offset starts as the 2D bias
        torch.testing.assert_close(t3.view(15, 169, -1)[dt], t2)
    # the averaged 3D patch embed on a static 2-frame clip equals the 2D embed of the frame
    img = torch.randn(1, 3, 64, 64)
    clip = img[:, :, None].repeat(1, 1, 2, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(target.patch_embed(clip), target.patch_embed_2d(img), rtol=1e-5, atol=1e-5)
    assert any("inflated" in n for n in notes) and any("tiled" in n for n in notes)


def test_inflation_resizes_tables():
    ckpt, _ = _image_swin_ckpt(window=12)  # a 2D window-12 checkpoint: bicubic to 13x13 first
    target = create_model(NANO)
    sd, _ = adapt_state_dict(ckpt, target)
    assert sd["layers.0.blocks.0.attn.relative_position_bias_table"].shape == (15 * 169, 1)
    # 8x7x7 -> 16x7x7 (SSv2-style): trilinear over the temporal axis; a constant table stays constant
    src = create_model(NANO)
    with torch.no_grad():
        for blk in src.layers[0].blocks:
            blk.attn.relative_position_bias_table.fill_(0.5)
    dst = create_model("videoswin_nano_patch244_window1677")
    sd, notes = adapt_state_dict({"state_dict": src.state_dict()}, dst)
    t = sd["layers.0.blocks.0.attn.relative_position_bias_table"]
    assert t.shape == (31 * 169, 1) and torch.allclose(t, torch.full_like(t, 0.5))
    assert any("interpolated" in n for n in notes)
    dst.load_state_dict(sd, strict=False)


def test_pretraining_from_a_bevt_i_checkpoint_inflates_its_image_stream(tmp_path):
    """BEVT's joint pretraining from bevt's own image-only (BEVT-I) run starts as the official one from the image
    stream's 2D Swin: every temporal offset of each position table is the trained dt = 0 slice (the others were
    never trained), the 3D patch embedding the 2D one averaged over time; the dropped heads are listed."""
    from bevt.models.inflate import load_pretrained
    from bevt.train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    src = create_bevt(NANO, mode="bevt_i", vocab_size=16)
    with torch.no_grad():
        for p in src.backbone.parameters():
            p.normal_()
    save_checkpoint(str(tmp_path / "bevt_i"), 1, model=src, trainer_state={},
                    config={"model": {"name": NANO, "mode": "bevt_i"}}, keep_last=1)
    dst = create_bevt(NANO, mode="bevt", vocab_size=16)
    notes = load_pretrained(dst.backbone, str(tmp_path / "bevt_i"))
    assert any("BEVT-I" in n for n in notes) and any("tiled" in n for n in notes), notes
    assert any("not in this model (dropped): " in n and "lm_head.weight" in n for n in notes), notes
    for name in ("layers.0.blocks.0", "layers.2.blocks.1"):
        t_src = dict(src.backbone.named_parameters())[f"{name}.attn.relative_position_bias_table"].detach()
        t_dst = dict(dst.backbone.named_parameters())[f"{name}.attn.relative_position_bias_table"].detach()
        n2 = 13 * 13
        for dt in range(15):
            torch.testing.assert_close(t_dst.view(15, n2, -1)[dt], t_src.view(15, n2, -1)[7])
    w2d = src.backbone.patch_embed_2d.proj.weight.detach()
    torch.testing.assert_close(dst.backbone.patch_embed_2d.proj.weight.detach(), w2d)
    torch.testing.assert_close(dst.backbone.patch_embed.proj.weight.detach(), w2d.unsqueeze(2).repeat(1, 1, 2, 1, 1) / 2)


def test_init_checkpoint_notes_and_errors_name_the_tensors(tmp_path):
    """Tensors a checkpoint has and the model has not are listed (dropped), tensors of another shape too; a
    checkpoint of another model size fails with the shapes and the setting to change."""
    from safetensors.torch import save_file

    from bevt.models.inflate import load_pretrained

    sd = {k: v.contiguous() for k, v in create_model(NANO).state_dict().items()}
    save_file(dict(sd, **{"extra.weight": torch.zeros(3), "layers.0.blocks.0.norm1.weight": torch.ones(7)}),
              str(tmp_path / "extra.safetensors"))
    notes = load_pretrained(create_model(NANO), str(tmp_path / "extra.safetensors"))
    assert any(n.startswith("1 checkpoint tensors not in this model (dropped): extra.weight") for n in notes), notes
    assert any("another shape than the model's, not loaded: layers.0.blocks.0.norm1.weight (7,) -> model (32,)" in n
               for n in notes), notes
    wide = VideoSwinTransformer(embed_dim=64, depths=(1, 1, 2, 1), num_heads=(2, 4, 8, 16))
    torch.save({"state_dict": {"backbone." + k: v for k, v in wide.state_dict().items()}}, tmp_path / "wide.pth")
    with pytest.raises(ValueError, match=r"wide.pth: no tensor of this checkpoint matches the model \(embed dim 32.*"
                                         r"patch_embed.proj.weight \(64, 3, 2, 4, 4\) -> model \(32, 3, 2, 4, 4\).*"
                                         r"another model size\? Set model.name"):
        load_pretrained(create_model(NANO), str(tmp_path / "wide.pth"))


def test_info_json_is_json(capsys):
    """`bevt info --json` prints every capability (dtypes too, also as keys) as JSON."""
    import json

    from bevt.cli import main

    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    caps = info["ops"]["masked_ce"]["triton"]["capabilities"]
    assert caps["weight_dtypes"] == ["float32", "float16", "bfloat16"] and "float32" in caps["tolerances"]["floor"]
