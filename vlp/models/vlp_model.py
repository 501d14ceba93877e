"""The vision-language model: image tower + BLIP text encoder/decoder, ITC projections, ITM head.

Layout follows BLIP (transformers' `BlipTextModel` / `BlipTextLMHeadModel`, BERT layers with
cross-attention):

- unimodal text encoder = `text_encoder` called without `encoder_hidden_states` (its
  cross-attention sub-layers are skipped), bidirectional mask, [CLS] first;
- image-grounded fusion encoder = the same `text_encoder` called with the image tokens as
  `encoder_hidden_states`, its first token replaced by [ENC];
- caption decoder = `text_decoder`, causal mask, first token [DEC], cross-attending to the
  image tokens (or to any conditioning sequence, e.g. fused question states for VQA).

Encoder and decoder do not share weights (BLIP shares all but self-attention): keeping them
apart is the layout transformers' own BLIP classes use, keeps state dicts standard, lets
captioning finetune the decoder without moving the retrieval encoder, and costs under 1M
parameters at the default size.

The image tower is any module returning [B, N, out_dim] tokens and holding its transformers
`backbone` (whose config is saved): vlp's towers (`vlp.models.towers`, tokens in the text
width) or BLIP's vision model (`towers.BlipImageTower`, tokens in the vision width, which BLIP's
text layers cross-attend to directly). Image tokens carry the global token first; `image_feat`/`text_feat` are L2-normalised
projections of the first token (ITC space of size `embed_dim`). The model holds the pieces
of the forward pass; the losses that train it (ITC, ITM, LM) are in `vlp.models.objectives`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn import functional as F

from vlp.errors import ConfigError
from vlp.models.tokenizer import DEC_TOKEN, ENC_TOKEN, load_tokenizer
from vlp.models.towers import (
    build_image_tower,
    fold_token_type_embeddings,
    image_tower_from_config,
    text_config,
    text_config_from_pretrained,
)
from vlp.models.weights import (
    CONFIG_NAME,
    TOKENIZER_DIR,
    WEIGHTS_NAME,
    SavedModel,
    check_config,
    load_weights,
    require_weights,
    saved_model_config,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from vlp.config import ModelConfig


class VLPModel(SavedModel):
    """Image tower + BLIP text encoder (unimodal and fusion) + caption decoder + ITC/ITM heads."""

    def __init__(
        self,
        cfg: ModelConfig,
        tokenizer: PreTrainedTokenizerBase,
        image_tower: nn.Module,
        text_encoder: nn.Module,
        text_decoder: nn.Module,
        temperature: float | None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.image_tower = image_tower
        self.text_encoder = text_encoder
        self.text_decoder = text_decoder
        hidden = text_encoder.config.hidden_size
        # image tokens are in the tower's width: the text width for vlp's towers, the
        # vision width for BLIP's (whose text layers cross-attend to it directly)
        self.vision_proj = nn.Linear(image_tower.out_dim, cfg.embed_dim)
        self.text_proj = nn.Linear(hidden, cfg.embed_dim)
        self.itm_head = nn.Linear(hidden, 2)
        # None: the temperature comes with the weights loaded (or filled) next
        self.temp = nn.Parameter(torch.tensor(float("nan" if temperature is None else temperature)))
        self.enc_token_id = tokenizer.convert_tokens_to_ids(ENC_TOKEN)
        self.dec_token_id = tokenizer.convert_tokens_to_ids(DEC_TOKEN)

    # ------------------------------------------------------------------ encoders
    def encode_image(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images [B,3,S,S] -> (image_embeds [B,N,H], image_feat [B,E] L2-normalised)."""
        image_embeds = self.image_tower(pixel_values)
        image_feat = F.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1)
        return image_embeds, image_feat

    def image_states(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The image tower's tokens [B,N,H] (`encode_image`'s first; token 0 is global)."""
        return self.image_tower(pixel_values)

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids [B,T] -> (text_embeds [B,T,H], text_feat [B,E] L2-normalised); text only."""
        text_embeds = self.text_encoder(
            input_ids=input_ids, attention_mask=attention_mask
        ).last_hidden_state
        text_feat = F.normalize(self.text_proj(text_embeds[:, 0]), dim=-1)
        return text_embeds, text_feat

    def fuse(
        self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Image-grounded text states [B,T,H]; position 0 ([ENC]) summarises the pair."""
        ids = input_ids.clone()
        ids[:, 0] = self.enc_token_id
        image_mask = torch.ones(
            image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device
        )
        return self.text_encoder(
            input_ids=ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
        ).last_hidden_state

    def itm_logits(
        self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Match logits [B,2] (index 1 = "matches") for B (image, text) pairs.

        Score k candidates of one query in one call by repeating its image_embeds (or ids).
        """
        return self.itm_head(self.fuse(image_embeds, input_ids, attention_mask)[:, 0])

    # ------------------------------------------------------------------ decoder
    def decoder_logits(
        self,
        cond_embeds: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cond_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Teacher-forced caption-decoder logits [B,T,V] of texts given a conditioning sequence.

        `cond_embeds` [B,N,H] is what the decoder cross-attends to: image tokens for captions,
        fused question states for VQA answers. Position 0 of `input_ids` ([CLS]) is replaced
        by [DEC]; the logits at position t predict token t+1.
        """
        ids = input_ids.clone()
        ids[:, 0] = self.dec_token_id
        if cond_mask is None:
            cond_mask = torch.ones(cond_embeds.shape[:-1], dtype=torch.long, device=ids.device)
        return self.text_decoder(
            input_ids=ids,
            attention_mask=attention_mask,
            encoder_hidden_states=cond_embeds,
            encoder_attention_mask=cond_mask,
            use_cache=False,
        ).logits

    @torch.no_grad()
    def generate_text(
        self,
        cond_embeds: torch.Tensor,
        cond_mask: torch.Tensor | None = None,
        *,
        num_beams: int,
        max_length: int,
    ) -> list[str]:
        """Decode one text per conditioning sequence with transformers' `generate`.

        Greedy when num_beams == 1, else beam search; `max_length` counts generated tokens
        ([DEC] excluded, the closing [SEP] included). Special tokens are stripped.
        """
        limit = self.text_decoder.config.max_position_embeddings - 1
        if max_length > limit:
            raise ConfigError(f"max_length={max_length} exceeds the decoder's {limit} positions")
        b = cond_embeds.shape[0]
        if cond_mask is None:
            cond_mask = torch.ones(
                cond_embeds.shape[:-1], dtype=torch.long, device=cond_embeds.device
            )
        bos = torch.full((b, 1), self.dec_token_id, dtype=torch.long, device=cond_embeds.device)
        out = self.text_decoder.generate(
            input_ids=bos,
            attention_mask=torch.ones_like(bos),
            encoder_hidden_states=cond_embeds,
            encoder_attention_mask=cond_mask,
            num_beams=num_beams,
            max_new_tokens=max_length,
            min_new_tokens=1,
            do_sample=False,
            eos_token_id=self.tokenizer.sep_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
            bos_token_id=self.dec_token_id,
        )
        texts = self.tokenizer.batch_decode(out, skip_special_tokens=True)
        return [t.strip() for t in texts]

    # ------------------------------------------------------------------ VQA by writing (BLIP)
    def question_states(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """What the answer decoder reads [B,T,H]: the question fused with the image ([ENC]
        first), every position of it, as BLIP's VQA and transformers' `BlipForQuestionAnswering`."""
        width = self.text_decoder.config.encoder_hidden_size
        hidden = self.text_encoder.config.hidden_size
        if width != hidden:
            raise ConfigError(
                f"writing answers needs a decoder that reads the fused question (width "
                f"{hidden}); this model's decoder cross-attends to width {width} (its image "
                "tokens'): use a BLIP VQA checkpoint (BlipForQuestionAnswering) or a model "
                "whose image tokens are in the text width"
            )
        image_embeds, _ = self.encode_image(pixel_values)
        return self.fuse(image_embeds, input_ids, attention_mask)

    def answer_loss(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        answer_ids: torch.Tensor,
        answer_mask: torch.Tensor,
    ) -> torch.Tensor:
        """The answer decoder's cross-entropy of the answers ([DEC] first) given the fused
        question, as BLIP trains VQA and `BlipForQuestionAnswering`'s loss: the decoder reads
        the question's unpadded positions, label smoothing 0.1."""
        states = self.question_states(pixel_values, input_ids, attention_mask)
        ids = answer_ids.clone()
        ids[:, 0] = self.dec_token_id
        return self.text_decoder(
            input_ids=ids,
            attention_mask=answer_mask,
            encoder_hidden_states=states,
            encoder_attention_mask=attention_mask,
            labels=ids.masked_fill(answer_mask == 0, -100),
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
        """One greedy answer per (image, question), written by the answer decoder from the
        fused question (`BlipForQuestionAnswering.generate`); at most `max_length` tokens."""
        states = self.question_states(pixel_values, input_ids, attention_mask)
        return self.generate_text(states, num_beams=1, max_length=max_length)

    @torch.no_grad()
    def generate_captions(
        self, pixel_values: torch.Tensor, num_beams: int, max_length: int
    ) -> list[str]:
        """Captions for a batch of images (greedy if num_beams == 1, else beam search)."""
        image_embeds, _ = self.encode_image(pixel_values)
        return self.generate_text(image_embeds, num_beams=num_beams, max_length=max_length)

    # ------------------------------------------------------------------ persistence
    def architecture_configs(self) -> dict[str, Any]:
        """The text and image towers' transformers configs."""
        return {
            "text_config": self.text_encoder.config.to_dict(),
            "image_config": self.image_tower.backbone.config.to_dict(),
        }

    @classmethod
    def from_saved(
        cls,
        p: Path,
        meta: dict[str, Any],
        device: str | torch.device = "cpu",
        fresh: bool = False,
    ) -> VLPModel:
        """`from_pretrained` of the local model directory `p` whose vlp_config.json is `meta`.

        Entries of vlp_config.json it does not read (e.g. the `loss_weights` that older
        model directories carry) are ignored.
        """
        from transformers import CONFIG_MAPPING, BlipTextConfig

        check_config(meta, p / CONFIG_NAME, ("text_config", "image_config.model_type"))
        if not fresh:
            require_weights(p)
        cfg = saved_model_config(meta)
        tokenizer = load_tokenizer(p / TOKENIZER_DIR, f"{p}/{TOKENIZER_DIR}")
        text_cfg = BlipTextConfig.from_dict(meta["text_config"])
        image_cfg_dict = dict(meta["image_config"])
        image_cfg = CONFIG_MAPPING[image_cfg_dict.pop("model_type")].from_dict(image_cfg_dict)
        image_tower = image_tower_from_config(image_cfg, text_cfg.hidden_size, fresh=fresh)
        model = _assemble(cfg, tokenizer, image_tower, text_cfg, None, None)
        if not fresh:
            load_weights(model, p / WEIGHTS_NAME, device)
        return model.to(device)


def _assemble(
    cfg: ModelConfig,
    tokenizer: PreTrainedTokenizerBase,
    image_tower: nn.Module,
    text_cfg: Any,
    text_pretrained: str | None,
    temperature: float | None,
) -> VLPModel:
    from transformers import BlipTextLMHeadModel, BlipTextModel

    if text_pretrained:
        src_vocab = text_cfg.vocab_size
        encoder = BlipTextModel.from_pretrained(
            text_pretrained, config=text_cfg, add_pooling_layer=False, local_files_only=True
        )
        fold_token_type_embeddings(encoder, text_pretrained)
        # The decoder starts from the same BERT weights; built fresh and copied into, because
        # loading a BERT checkpoint straight into BlipTextLMHeadModel leaves the LM-head bias
        # uninitialised (it is absent from the checkpoint and outside `_init_weights`).
        decoder = BlipTextLMHeadModel(text_cfg)
        decoder.bert.load_state_dict(encoder.state_dict())
        if src_vocab != len(tokenizer):
            encoder.resize_token_embeddings(len(tokenizer))
            decoder.resize_token_embeddings(len(tokenizer))
    else:
        encoder = BlipTextModel(text_cfg, add_pooling_layer=False)
        decoder = BlipTextLMHeadModel(text_cfg)
    return VLPModel(cfg, tokenizer, image_tower, encoder, decoder, temperature)


def build_model(
    model_cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, temperature: float
) -> VLPModel:
    """A VLPModel for `model_cfg`: tiny from-scratch towers, or those named by `*_pretrained`.

    The text vocabulary is the tokenizer's (`len(tokenizer)`), not `model_cfg.vocab_size`.
    `temperature` initialises the learnable ITC temperature (model.temperature).
    """
    if model_cfg.text_pretrained:
        text_cfg = text_config_from_pretrained(model_cfg.text_pretrained, model_cfg, tokenizer)
    else:
        text_cfg = text_config(model_cfg, tokenizer)
    image_tower = build_image_tower(model_cfg, text_cfg.hidden_size)
    return _assemble(
        model_cfg, tokenizer, image_tower, text_cfg, model_cfg.text_pretrained, temperature
    )
