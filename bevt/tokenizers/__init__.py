"""Image tokenizers for BEVT's targets: uint8 frames (N, 3, H, W) -> codebook ids (N, H/8, W/8).

``load_tokenizer(path)`` reads OpenAI's DALL-E ``encoder.pkl`` (the paper's tokenizer) or a file written by
bevt (a VQ tokenizer from ``train_vq_tokenizer`` / ``bevt tokenizer train``, or a safetensors copy of the
DALL-E encoder). See docs/tokenizers.md.
"""
from bevt.tokenizers.base import Tokenizer, check_images, load_tokenizer, parse_dtype
from bevt.tokenizers.dalle import (DalleEncoder, DalleTokenizer, UnsafePickleError, load_dalle_encoder,
                                   map_pixels, unmap_pixels)
from bevt.tokenizers.vq import VQConfig, VQTokenizer, VQVAE, is_vq_tokenizer_file, train_vq_tokenizer

__all__ = [
    "Tokenizer", "check_images", "load_tokenizer", "parse_dtype",
    "DalleEncoder", "DalleTokenizer", "UnsafePickleError", "load_dalle_encoder", "map_pixels", "unmap_pixels",
    "VQConfig", "VQTokenizer", "VQVAE", "is_vq_tokenizer_file", "train_vq_tokenizer",
]
