"""The t5 family: image tokens in a T5 encoder-decoder (VL-T5 / SimVLM / PaLI style).

`ImageT5` holds one of vlp's image towers (`vlp.models.towers`, tokens projected to T5's
width) and a transformers `T5ForConditionalGeneration`. The image tower's tokens are
prepended to the embedded text tokens (a prompt: empty for captions, the question for VQA)
and T5's encoder reads them jointly; T5's decoder writes the caption or answer. It is trained
with the captioning LM objective (`caption_loss`, a prefix LM on the pair: the image is the
prefix, the caption the continuation).

Built from params (`build`: a T5 sized by the model section with vlp's trained tokenizer, or
the local checkpoint `model.text_pretrained` with its own tokenizer), or from a local
`T5ForConditionalGeneration` directory (`model.init_from`, with its SentencePiece tokenizer;
the image tower and its projection come from the model params, since the checkpoint has
none). Without image tokens the model is T5 itself: `text_logits` equals transformers' T5.

Its base class and the registry's functions are shared with the other generative family
(`vlp.models.generative`).

A model directory holds vlp_config.json (`model` with `family: t5`, `t5_config`,
`image_config` and `generation_config`), model.safetensors and tokenizer/.
"""

from __future__ import annotations

import dataclasses
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
from vlp.models.towers import build_image_tower, checkpoint_text_length, image_tower_from_config
from vlp.models.weights import load_transformers

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerBase, T5ForConditionalGeneration

    from vlp.config import ModelConfig

FAMILY = "t5"
MODEL_TYPE = "t5"  # config.json model_type of the checkpoints it reads


class ImageT5(GenerativeModel):
    """An image tower and a T5 encoder-decoder reading its tokens before the text's."""

    CONFIG_KEYS = ("t5_config", "generation_config", "image_config.model_type")

    def __init__(
        self,
        cfg: ModelConfig,
        tokenizer: PreTrainedTokenizerBase,
        image_tower: nn.Module,
        t5: T5ForConditionalGeneration,
    ) -> None:
        super().__init__(cfg, tokenizer)
        self.image_tower = image_tower
        self.t5 = t5
        c = t5.config
        self.tokens = DecoderTokens.of(
            tokenizer, c.decoder_start_token_id, c.eos_token_id, c.pad_token_id
        )

    def image_states(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The image tower's tokens [B, N, D] as T5's encoder reads them (global token first)."""
        return self.image_tower(pixel_values)

    def joint_inputs(
        self,
        pixel_values: torch.Tensor | None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings [B, N + T, D], mask [B, N + T]) the T5 encoder reads: the image tower's
        N tokens (none without pixels), then the T text tokens' embeddings."""
        parts, masks = [], []
        if pixel_values is not None:
            image = self.image_states(pixel_values)
            parts.append(image)
            masks.append(torch.ones(image.shape[:2], dtype=torch.long, device=image.device))
        if input_ids is not None:
            parts.append(self.t5.get_input_embeddings()(input_ids))
            masks.append(
                attention_mask if attention_mask is not None else torch.ones_like(input_ids)
            )
        if not parts:
            raise ValueError("joint_inputs needs pixels or text")
        return torch.cat(parts, dim=1), torch.cat(masks, dim=1)

    def text_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, decoder_input_ids: torch.Tensor
    ) -> torch.Tensor:
        """Decoder logits [B, T', V] of a text-only input: T5 itself."""
        return self.joint_logits(None, input_ids, attention_mask, decoder_input_ids)

    def joint_logits(
        self,
        pixel_values: torch.Tensor | None,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        decoder_input_ids: torch.Tensor,
    ) -> torch.Tensor:
        """Teacher-forced decoder logits [B, T', V] given images and a text prompt."""
        embeds, mask = self.joint_inputs(pixel_values, input_ids, attention_mask)
        return self.t5(
            inputs_embeds=embeds,
            attention_mask=mask,
            decoder_input_ids=decoder_input_ids,
            use_cache=False,
        ).logits

    def caption_loss(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Mean next-token cross-entropy of tokenised captions given the images alone."""
        embeds, mask = self.joint_inputs(pixel_values)
        labels = self.tokens.targets(input_ids, attention_mask)
        return self.t5(
            inputs_embeds=embeds, attention_mask=mask, labels=labels, use_cache=False
        ).loss

    def answer_loss(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        answer_ids: torch.Tensor,
        answer_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Mean cross-entropy of the answers given the image and the question (the encoder
        reads both, the decoder writes the answer)."""
        embeds, mask = self.joint_inputs(pixel_values, input_ids, attention_mask)
        labels = self.tokens.targets(answer_ids, answer_mask)
        return self.t5(
            inputs_embeds=embeds, attention_mask=mask, labels=labels, use_cache=False
        ).loss

    @torch.no_grad()
    def generate_answers(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        max_length: int,
    ) -> list[str]:
        """One greedy answer per (image, question)."""
        embeds, mask = self.joint_inputs(pixel_values, input_ids, attention_mask)
        return self.generate_text(embeds, mask, 1, max_length)

    @torch.no_grad()
    def generate_text(
        self, embeds: torch.Tensor, mask: torch.Tensor, num_beams: int, max_length: int
    ) -> list[str]:
        """One text per encoder input (`joint_inputs`): transformers' `generate`, greedy when
        num_beams == 1 else beam search, at most `max_length` tokens; special tokens dropped."""
        encoder_outputs = self.t5.get_encoder()(inputs_embeds=embeds, attention_mask=mask)
        out = self.t5.generate(
            encoder_outputs=encoder_outputs,
            attention_mask=mask,
            num_beams=num_beams,
            max_new_tokens=max_length,
            do_sample=False,
        )
        return self.decode(out)

    @torch.no_grad()
    def generate_captions(
        self, pixel_values: torch.Tensor, num_beams: int, max_length: int
    ) -> list[str]:
        """One caption per image (greedy if num_beams == 1, else beam search)."""
        return self.generate_text(*self.joint_inputs(pixel_values), num_beams, max_length)

    # ------------------------------------------------------------------ persistence
    def architecture_configs(self) -> dict[str, Any]:
        """T5's config and generation config, and the image tower's backbone config."""
        return {
            "t5_config": self.t5.config.to_dict(),
            "generation_config": self.t5.generation_config.to_dict(),
            "image_config": self.image_tower.backbone.config.to_dict(),
        }

    @classmethod
    def from_configs(
        cls,
        cfg: ModelConfig,
        tokenizer: PreTrainedTokenizerBase,
        meta: dict[str, Any],
        fresh: bool,
    ) -> ImageT5:
        """T5 of the saved config and generation config, the image tower of `image_config`."""
        from transformers import (
            CONFIG_MAPPING,
            GenerationConfig,
            T5Config,
            T5ForConditionalGeneration,
        )

        t5 = T5ForConditionalGeneration(T5Config.from_dict(meta["t5_config"]))
        t5.generation_config = GenerationConfig.from_dict(meta["generation_config"])
        image_cfg = dict(meta["image_config"])
        image_cfg = CONFIG_MAPPING[image_cfg.pop("model_type")].from_dict(image_cfg)
        tower = image_tower_from_config(image_cfg, t5.config.d_model, fresh=fresh)
        return cls(cfg, tokenizer, tower, t5)


def _t5(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> T5ForConditionalGeneration:
    """`model.text_pretrained`'s T5, else a T5 of `cfg`'s sizes whose vocabulary is `tokenizer`'s."""
    from transformers import T5Config, T5ForConditionalGeneration

    if cfg.text_pretrained:
        t5 = load_transformers(
            T5ForConditionalGeneration, Path(cfg.text_pretrained), "model.text_pretrained"
        )
        if len(tokenizer) > t5.config.vocab_size:
            raise ConfigError(
                f"model.text_pretrained: the tokenizer has {len(tokenizer)} tokens, more than "
                f"the T5's {t5.config.vocab_size}"
            )
        return t5
    check_heads(cfg)
    tokens = DecoderTokens.choose(tokenizer)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=cfg.hidden_size,
        d_kv=cfg.hidden_size // cfg.num_heads,
        d_ff=cfg.intermediate_size,
        num_layers=cfg.num_text_layers,
        num_decoder_layers=cfg.num_text_layers,
        num_heads=cfg.num_heads,
        dropout_rate=0.0,
        decoder_start_token_id=tokens.start,
        eos_token_id=tokens.end,
        pad_token_id=tokens.pad,
    )
    t5 = T5ForConditionalGeneration(config)
    set_decoder_tokens(tokens, t5.generation_config)
    return t5


def build_image_t5(
    cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, temperature: float
) -> ImageT5:
    """An `ImageT5` of params' model section (`temperature` unused: no contrastive loss).

    The image tower is `model.image_tower` (from `model.image_pretrained` if set) projecting
    to T5's width. With `model.text_pretrained`, `tokenizer` is the one beside that T5.
    """
    tokenizer = with_padding(tokenizer, "tokenizer")
    t5 = _t5(cfg, tokenizer)
    return ImageT5(cfg, tokenizer, build_image_tower(cfg, t5.config.d_model), t5)


# ---------------------------------------------------------------- foreign checkpoints


def load_checkpoint(
    p: Path, base: ModelConfig | None, temperature: float | None, key: str, as_is: bool
) -> ImageT5:
    """The T5ForConditionalGeneration directory `p` with its tokenizer, and an image tower of
    the model params `base` (a T5 checkpoint has none); seed torch first."""
    from transformers import AutoConfig

    if not _FAMILY.reads_checkpoint(p, key):
        raise ConfigError(f"{key}: {p} is not a transformers T5 directory")
    if base is None or as_is:
        raise ConfigError(
            f"{key}: {p} is a T5 text model: its image tower is built from the model params "
            "and must be trained (pretrain with model.init_from) before it reads images"
        )
    config = AutoConfig.from_pretrained(str(p), local_files_only=True)
    tokenizer = load_text_tokenizer(p, key)
    cfg = dataclasses.replace(
        base,
        # T5's positions are relative: its own length is the one its tokenizer declares
        max_text_length=checkpoint_text_length(tokenizer.model_max_length, base, p),
        family=FAMILY,
        init_from=str(p),
        text_pretrained=str(p),
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        num_text_layers=config.num_layers,
        num_heads=config.num_heads,
        intermediate_size=config.d_ff,
        temperature=None,
    )
    return build_image_t5(cfg, tokenizer, 0.0)


# ---------------------------------------------------------------- the family (vlp.models.family)
_FAMILY = GenerativeFamily(ImageT5, FAMILY, MODEL_TYPE)
build = build_image_t5
load_tokenizer = load_text_tokenizer
load, fresh, objective = _FAMILY.load, _FAMILY.fresh, _FAMILY.objective
reads_checkpoint = _FAMILY.reads_checkpoint
