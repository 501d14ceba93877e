"""Tiny random transformers ViT, GPT-2 and VisionEncoderDecoderModel (ViT + GPT-2) directories,
with a byte-level BPE GPT-2 tokenizer (no padding token, as GPT-2's) and a ViTImageProcessor."""

from __future__ import annotations

from pathlib import Path

from tests.checkpoints.blip import WORDS

IMAGE_SIZE = 32
ENCODER_WIDTH = 24  # not the decoder's 32: the encoder-to-decoder projection must be used
DECODER_WIDTH = 32
EOT = "<|endoftext|>"


def gpt2_tokenizer(path: Path):
    """A GPT2 tokenizer (byte-level BPE trained on the shapes words) saved in `path`."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer()
    corpus = [" ".join(WORDS)] * 4 + [f"a {w}" for w in WORDS]
    bpe.train_from_iterator(corpus, vocab_size=300, min_frequency=1, special_tokens=[EOT])
    tok = GPT2TokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token=EOT, eos_token=EOT, unk_token=EOT
    )
    path.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(path))
    return tok


def _perturb(model, seed: int) -> None:
    """Random offsets on every weight: no zero bias or unit norm a wrong mapping would hide."""
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)


def write_tiny_vit(path: Path, seed: int = 0) -> Path:
    """A random ViTModel (width 24, one layer, patch 8) and its image processor."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    config = ViTConfig(
        image_size=IMAGE_SIZE,
        patch_size=8,
        hidden_size=ENCODER_WIDTH,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=48,
    )
    model = ViTModel(config, add_pooling_layer=False)
    _perturb(model, seed)
    model.save_pretrained(str(path))
    ViTImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=[0.4, 0.4, 0.4],
        image_std=[0.3, 0.3, 0.3],
    ).save_pretrained(str(path))
    return path


def write_tiny_gpt2(path: Path, seed: int = 0) -> Path:
    """A random GPT2LMHeadModel (width 32, two layers, no cross-attention) and its tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = gpt2_tokenizer(path)
    config = GPT2Config(
        vocab_size=len(tok),
        n_positions=40,
        n_embd=DECODER_WIDTH,
        n_layer=2,
        n_head=2,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    model = GPT2LMHeadModel(config)
    _perturb(model, seed + 1)
    model.save_pretrained(str(path))
    return path


def write_tiny_vit_gpt2(path: Path, seed: int = 0) -> Path:
    """A random VisionEncoderDecoderModel (tiny ViT + GPT-2 with cross-attention), its GPT-2
    tokenizer and ViT image processor, configured as ViT-GPT2 captioners are: generation
    starts from and pads with <|endoftext|>, and beam search has its own settings."""
    from transformers import (
        AutoTokenizer,
        GPT2LMHeadModel,
        VisionEncoderDecoderModel,
        ViTImageProcessor,
        ViTModel,
    )

    vit = write_tiny_vit(path.parent / f"{path.name}.vit", seed)
    gpt2 = write_tiny_gpt2(path.parent / f"{path.name}.gpt2", seed)
    encoder = ViTModel.from_pretrained(str(vit), add_pooling_layer=False)
    decoder = GPT2LMHeadModel.from_pretrained(str(gpt2), add_cross_attention=True)
    model = VisionEncoderDecoderModel(encoder=encoder, decoder=decoder)
    _perturb(model, seed + 2)  # the cross-attention starts random, not at its init
    eot = model.decoder.config.eos_token_id
    for config in (model.config, model.generation_config):
        config.decoder_start_token_id = eot
        config.pad_token_id = eot
        config.eos_token_id = eot
    model.generation_config.num_beams = 4
    model.generation_config.length_penalty = 0.8
    model.generation_config.no_repeat_ngram_size = 3
    model.save_pretrained(str(path))
    AutoTokenizer.from_pretrained(str(gpt2)).save_pretrained(str(path))
    ViTImageProcessor.from_pretrained(str(vit)).save_pretrained(str(path))
    return path
