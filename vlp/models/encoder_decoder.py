"""The encoder-decoder family: transformers' `VisionEncoderDecoderModel`, a vision transformer
read by a GPT-2 decoder through cross-attention, trained with the captioning LM objective.

`ImageCaptioner` holds the `VisionEncoderDecoderModel` and its tokenizer. It is built

- from params (`build`): a ViT (`model.image_tower: vit`) or CLIP vision transformer (`clip`)
  sized by the model section, or the local checkpoint `model.image_pretrained` (ViT, ViTMAE,
  CLIP); a GPT-2 with cross-attention (`add_cross_attention`) sized by the model section with
  vlp's trained tokenizer, or the local GPT-2 checkpoint `model.text_pretrained` with its own
  tokenizer (its cross-attention starts untrained);
- from a local `VisionEncoderDecoderModel` directory (`model.init_from`, e.g. a ViT-GPT2
  captioner): its weights, generation config, tokenizer and image processor, so that it
  captions exactly as transformers' own model does.

The image encoder runs with `interpolate_pos_encoding`, so any image size works (a no-op at
the checkpoint's own size). The decoder starts every text from the config's
`decoder_start_token_id` and learns to stop on its end token (`vlp.models.seq2seq_text`):
GPT-2's <|endoftext|>, which also pads, or vlp's [SEP]. It has no contrastive embeddings nor
ITM head: it captions, and retrieval does not apply to it.

Its base class and the registry's functions are shared with the other generative family
(`vlp.models.generative`).

A model directory holds vlp_config.json (`model` with `family: encoder-decoder`,
`encoder_decoder_config` and `generation_config`), model.safetensors and tokenizer/.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vlp.errors import ConfigError
from vlp.models.generative import (
    GenerativeFamily,
    GenerativeModel,
    check_heads,
    set_decoder_tokens,
)
from vlp.models.seq2seq_text import DecoderTokens, load_text_tokenizer, with_padding
from vlp.models.towers import (
    TOWER_OF_MODEL_TYPE,
    checkpoint_text_length,
    vit_from_mae,
    vit_sizes,
)
from vlp.models.weights import load_transformers

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, VisionEncoderDecoderModel

    from vlp.config import ModelConfig

FAMILY = "encoder-decoder"
MODEL_TYPE = "vision-encoder-decoder"  # config.json model_type of the checkpoints it reads
ENCODER_TOWERS = ("vit", "clip")  # model.image_tower values it builds an encoder for


class ImageCaptioner(GenerativeModel):
    """A `VisionEncoderDecoderModel` and its tokenizer: captions images, trained with the LM loss."""

    CONFIG_KEYS = ("encoder_decoder_config", "generation_config")

    def __init__(
        self, cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, ved: VisionEncoderDecoderModel
    ) -> None:
        super().__init__(cfg, tokenizer)
        if getattr(ved.encoder, "pooler", None) is not None:
            # the decoder reads the last hidden state alone: a ViT pooler would never train,
            # and whether one exists depends on how the encoder was built
            ved.encoder.pooler = None
        self.ved = ved
        config = ved.config
        self.tokens = DecoderTokens.of(
            tokenizer, config.decoder_start_token_id, _end_token(ved), config.pad_token_id
        )
        self._interpolates = (
            "interpolate_pos_encoding" in inspect.signature(ved.encoder.forward).parameters
        )

    def encode_image(self, pixel_values: torch.Tensor) -> Any:
        """The image encoder's output (`last_hidden_state` [B, N, H]) for a pixel batch."""
        extra = {"interpolate_pos_encoding": True} if self._interpolates else {}
        return self.ved.encoder(pixel_values=pixel_values, **extra)

    def image_states(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The encoder's tokens [B, N, H] (a ViT's CLS token first)."""
        return self.encode_image(pixel_values).last_hidden_state

    def decoder_logits(
        self, pixel_values: torch.Tensor, decoder_input_ids: torch.Tensor
    ) -> torch.Tensor:
        """Teacher-forced logits [B, T, V]: position t predicts the token after input t."""
        return self.ved(
            encoder_outputs=self.encode_image(pixel_values),
            decoder_input_ids=decoder_input_ids,
            use_cache=False,
        ).logits

    def caption_loss(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Mean next-token cross-entropy of tokenised captions (`DecoderTokens.targets`)."""
        labels = self.tokens.targets(input_ids, attention_mask)
        return self.ved(
            encoder_outputs=self.encode_image(pixel_values), labels=labels, use_cache=False
        ).loss

    def answer_loss(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        answer_ids: torch.Tensor,
        answer_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Mean cross-entropy of the answers' tokens, the decoder reading the question first
        (`DecoderTokens.prompted`: start, question, end, answer, end)."""
        inputs, labels = self.tokens.prompted(input_ids, attention_mask, answer_ids, answer_mask)
        return self.ved(
            encoder_outputs=self.encode_image(pixel_values),
            decoder_input_ids=inputs,
            labels=labels,
            use_cache=False,
        ).loss

    @torch.no_grad()
    def generate_answers(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        max_length: int,
    ) -> list[str]:
        """One greedy answer per (image, question): the decoder continues the question's
        prompt. Questions of one prompt length decode together (GPT-2 reads no padding)."""
        from transformers.modeling_outputs import BaseModelOutput

        states = self.encode_image(pixel_values).last_hidden_state
        prompts = self.tokens.prompts(input_ids, attention_mask)
        limit = self.ved.decoder.config.max_position_embeddings
        answers = [""] * len(prompts)
        for length in sorted({len(p) for p in prompts}):
            if length + max_length > limit:
                raise ConfigError(
                    f"a question of {length} tokens and max_length={max_length} exceed the "
                    f"decoder's {limit} positions"
                )
            rows = [i for i, p in enumerate(prompts) if len(p) == length]
            out = self.ved.generate(
                encoder_outputs=BaseModelOutput(last_hidden_state=states[rows]),
                decoder_input_ids=torch.tensor([prompts[i] for i in rows], device=states.device),
                num_beams=1,
                max_new_tokens=max_length,
                do_sample=False,
            )
            for i, text in zip(rows, self.decode(out[:, length:]), strict=True):
                answers[i] = text
        return answers

    @torch.no_grad()
    def generate_captions(
        self, pixel_values: torch.Tensor, num_beams: int, max_length: int
    ) -> list[str]:
        """One caption per image: transformers' `generate` (greedy when num_beams == 1, else
        beam search, the model's generation config otherwise), at most `max_length` tokens."""
        limit = self.ved.decoder.config.max_position_embeddings - 1
        if max_length > limit:
            raise ConfigError(f"max_length={max_length} exceeds the decoder's {limit} positions")
        out = self.ved.generate(
            encoder_outputs=self.encode_image(pixel_values),
            num_beams=num_beams,
            max_new_tokens=max_length,
            do_sample=False,
        )
        return self.decode(out)

    # ------------------------------------------------------------------ persistence
    def architecture_configs(self) -> dict[str, Any]:
        """The `VisionEncoderDecoderConfig` and the generation config."""
        return {
            "encoder_decoder_config": self.ved.config.to_dict(),
            "generation_config": self.ved.generation_config.to_dict(),
        }

    @classmethod
    def from_configs(
        cls,
        cfg: ModelConfig,
        tokenizer: PreTrainedTokenizerBase,
        meta: dict[str, Any],
        fresh: bool,
    ) -> ImageCaptioner:
        """The `VisionEncoderDecoderModel` of the saved config and generation config."""
        from transformers import (
            GenerationConfig,
            VisionEncoderDecoderConfig,
            VisionEncoderDecoderModel,
        )

        config = VisionEncoderDecoderConfig.from_dict(meta["encoder_decoder_config"])
        ved = VisionEncoderDecoderModel(config=config)
        ved.generation_config = GenerationConfig.from_dict(meta["generation_config"])
        return cls(cfg, tokenizer, ved)


def _end_token(ved: VisionEncoderDecoderModel) -> int:
    """The id generation stops on: the generation config's end token (the first of several)."""
    candidates = (ved.generation_config, ved.config, ved.decoder.config)
    end = next((c.eos_token_id for c in candidates if c.eos_token_id is not None), None)
    if isinstance(end, list):
        end = end[0]
    if end is None:
        raise ConfigError("the encoder-decoder model has no end-of-text token (eos_token_id)")
    return int(end)


# ---------------------------------------------------------------- building from params
def _encoder(cfg: ModelConfig) -> PreTrainedModel:
    """The image encoder: `model.image_pretrained`'s, else a ViT / CLIP vision model of `cfg`."""
    from transformers import (
        AutoConfig,
        CLIPVisionConfig,
        CLIPVisionModel,
        ViTConfig,
        ViTModel,
    )

    if cfg.image_tower not in ENCODER_TOWERS:
        raise ConfigError(
            f"model.image_tower: {cfg.image_tower!r}, but the {FAMILY} family's image encoder "
            f"is a vision transformer: one of {', '.join(ENCODER_TOWERS)}"
        )
    if not cfg.image_pretrained:
        # image_size only sizes the position table; the encoder interpolates it
        sizes = {"image_size": 64, **vit_sizes(cfg)}
        if cfg.image_tower == "clip":
            return CLIPVisionModel(CLIPVisionConfig(**sizes, attention_dropout=0.0))
        return ViTModel(
            ViTConfig(**sizes, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
            add_pooling_layer=False,
        )
    p = Path(cfg.image_pretrained)
    try:
        kind = AutoConfig.from_pretrained(str(p), local_files_only=True).model_type
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.image_pretrained: no transformers config in {p}: {e}") from e
    if TOWER_OF_MODEL_TYPE.get(kind) != cfg.image_tower:
        raise ConfigError(
            f"model.image_tower: {cfg.image_tower!r} does not match model.image_pretrained {p}, "
            f"which holds a {kind!r} model"
        )
    if kind == "vit_mae":
        return vit_from_mae(str(p))
    if kind == "vit":
        return load_transformers(ViTModel, p, "model.image_pretrained")
    # a CLIPModel directory or its vision model alone: the vision transformer either way
    return load_transformers(CLIPVisionModel, p, "model.image_pretrained")


def _decoder(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """The GPT-2 decoder with cross-attention: `model.text_pretrained`'s, else one of `cfg`."""
    from transformers import GPT2Config, GPT2LMHeadModel

    if cfg.text_pretrained:
        p = Path(cfg.text_pretrained)
        try:
            return GPT2LMHeadModel.from_pretrained(
                str(p),
                add_cross_attention=True,
                local_files_only=True,
                dtype=torch.float32,
            )
        except (OSError, ValueError) as e:
            raise ConfigError(
                f"model.text_pretrained: cannot load a GPT-2 decoder from {p}: {e}"
            ) from None
    check_heads(cfg)
    tokens = DecoderTokens.choose(tokenizer)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        # headroom beyond max_text_length for decoding longer outputs than training texts
        n_positions=max(cfg.max_text_length, 64) + 1,
        n_embd=cfg.hidden_size,
        n_layer=cfg.num_text_layers,
        n_head=cfg.num_heads,
        n_inner=cfg.intermediate_size,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokens.start,
        eos_token_id=tokens.end,
        pad_token_id=tokens.pad,
        add_cross_attention=True,
    )
    return GPT2LMHeadModel(config)


def build_captioner(
    cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, temperature: float
) -> ImageCaptioner:
    """An `ImageCaptioner` of params' model section (`temperature` unused: no contrastive loss).

    With `model.text_pretrained`, `tokenizer` is the one beside that checkpoint (the pretrain
    stage reads it there, `vlp.models.tokenizer.build_tokenizer`).
    """
    from transformers import VisionEncoderDecoderModel

    tokenizer = with_padding(tokenizer, "tokenizer")
    decoder = _decoder(cfg, tokenizer)
    if len(tokenizer) > decoder.config.vocab_size:
        raise ConfigError(
            f"model.text_pretrained: the tokenizer has {len(tokenizer)} tokens, more than the "
            f"decoder's {decoder.config.vocab_size}"
        )
    ved = VisionEncoderDecoderModel(encoder=_encoder(cfg), decoder=decoder)
    tokens = DecoderTokens.choose(tokenizer)
    set_decoder_tokens(tokens, ved.config, ved.generation_config)
    ved.generation_config.bos_token_id = tokens.start
    return ImageCaptioner(cfg, tokenizer, ved)


# ---------------------------------------------------------------- foreign checkpoints


def model_config_from_checkpoint(
    ved: VisionEncoderDecoderModel, source: str, base: ModelConfig | None
) -> ModelConfig:
    """The `ModelConfig` that describes a VisionEncoderDecoderModel checkpoint.

    Text sizes are the decoder's, image sizes the encoder's; `max_text_length` is the
    decoder's positions less the start token unless `base.max_text_length` sets it.
    """
    from vlp.config import ModelConfig

    enc, dec = ved.config.encoder, ved.config.decoder
    hidden = dec.hidden_size
    length = checkpoint_text_length(dec.max_position_embeddings - 1, base, source)
    patch = getattr(enc, "patch_size", 0)
    return ModelConfig(
        family=FAMILY,
        init_from=source,
        image_tower=TOWER_OF_MODEL_TYPE.get(enc.model_type, enc.model_type),
        image_pretrained=None,
        text_pretrained=None,
        tokenizer_pretrained=None,
        vocab_size=dec.vocab_size,
        hidden_size=hidden,
        num_text_layers=dec.num_hidden_layers,
        num_heads=dec.num_attention_heads,
        intermediate_size=getattr(dec, "n_inner", None) or 4 * hidden,
        embed_dim=hidden,
        max_text_length=length,
        patch_size=patch if isinstance(patch, int) else int(patch[0]),
        num_image_layers=getattr(enc, "num_hidden_layers", 0),
        cnn_channels=[],
        temperature=None,
    )


def load_checkpoint(
    p: Path, base: ModelConfig | None, temperature: float | None, key: str, as_is: bool
) -> ImageCaptioner:
    """The VisionEncoderDecoderModel directory `p` with the tokenizer saved beside it."""
    from transformers import VisionEncoderDecoderModel

    if not _FAMILY.reads_checkpoint(p, key):
        raise ConfigError(f"{key}: {p} is not a transformers VisionEncoderDecoderModel directory")
    ved = load_transformers(VisionEncoderDecoderModel, p, key)
    if ved.config.decoder_start_token_id is None or ved.config.pad_token_id is None:
        raise ConfigError(
            f"{key}: {p}/config.json lacks decoder_start_token_id or pad_token_id, which "
            "captioning needs (set them as the checkpoint's model card says)"
        )
    tokenizer = load_text_tokenizer(p, key)
    return ImageCaptioner(model_config_from_checkpoint(ved, str(p), base), tokenizer, ved)


# ---------------------------------------------------------------- the family (vlp.models.family)
_FAMILY = GenerativeFamily(ImageCaptioner, FAMILY, MODEL_TYPE)
build = build_captioner
load_tokenizer = load_text_tokenizer
load, fresh, objective = _FAMILY.load, _FAMILY.fresh, _FAMILY.objective
reads_checkpoint = _FAMILY.reads_checkpoint
