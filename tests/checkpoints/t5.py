"""A tiny random transformers T5ForConditionalGeneration directory with a SentencePiece-style
(Unigram) T5 tokenizer built offline."""

from __future__ import annotations

from pathlib import Path

from tests.checkpoints.blip import WORDS


def t5_tokenizer(path: Path):
    """A T5 tokenizer (Unigram over the shapes words; <pad> 0, </s> 1, <unk> 2; every text
    closed by </s>) saved in `path`."""
    from tokenizers import SentencePieceUnigramTokenizer, processors
    from transformers import T5TokenizerFast

    sp = SentencePieceUnigramTokenizer()
    corpus = [" ".join(WORDS)] * 3 + [f"a {w}" for w in WORDS]
    sp.train_from_iterator(
        corpus,
        vocab_size=120,
        special_tokens=["<pad>", "</s>", "<unk>"],
        unk_token="<unk>",
        show_progress=False,
    )
    tok = sp._tokenizer
    eos = tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos)]
    )
    t5 = T5TokenizerFast(
        tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0
    )
    path.mkdir(parents=True, exist_ok=True)
    t5.save_pretrained(str(path))
    return t5


def write_tiny_t5(path: Path, seed: int = 0) -> Path:
    """A random T5ForConditionalGeneration (d_model 32, one layer each side) and its tokenizer,
    configured as T5's are: decoding starts from <pad> and stops on </s>."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    tok = t5_tokenizer(path)
    config = T5Config(
        vocab_size=len(tok),
        d_model=32,
        d_kv=16,
        d_ff=48,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=2,
        decoder_start_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(config)
    with torch.no_grad():  # no unit norms a wrong mapping would hide
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        # zero <pad> and </s> logits: random decoding writes some text before it stops
        model.get_output_embeddings().weight[[tok.pad_token_id, tok.eos_token_id]] = 0.0
    model.save_pretrained(str(path))
    return path
