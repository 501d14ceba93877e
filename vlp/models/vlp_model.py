"""The vision-language model: image tower + BLIP text encoder/decoder, with ITC, ITM and LM.

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

Image tokens carry the global token first; `image_feat`/`text_feat` are L2-normalised
projections of the first token (ITC space of size `embed_dim`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn import functional as F

from vlp.errors import ConfigError
from vlp.io import atomic_dir
from vlp.models.tokenizer import DEC_TOKEN, ENC_TOKEN, load_tokenizer, local_dir
from vlp.models.towers import (
    ImageTower,
    backbone_from_config,
    build_image_tower,
    text_config,
    text_config_from_pretrained,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from vlp.config import ModelConfig

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "vlp_config.json"
TOKENIZER_DIR = "tokenizer"
TEMP_MIN, TEMP_MAX = 0.001, 0.5
DEFAULT_WEIGHTS = {"itc": 1.0, "itm": 1.0, "lm": 1.0}


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _gather_rows(t: torch.Tensor, with_grad: bool, pad_value: int | float = 0) -> torch.Tensor:
    """Concatenate `t` from every process along dim 0 (a no-op without DDP).

    Ranks may hold different batch sizes and (for token ids) lengths: tensors are padded to
    the largest, gathered, and the padding rows dropped; padded columns are kept (their
    attention mask is 0). `with_grad` uses the autograd-aware all_gather so that gradients
    flow back to the process that produced each row.
    """
    world = _world_size()
    if world == 1:
        return t
    dist = torch.distributed
    shape = torch.tensor(t.shape, device=t.device)
    shapes = [torch.zeros_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape)
    max_shape = torch.stack(shapes).max(dim=0).values.tolist()
    pad = []
    for dim in reversed(range(t.dim())):
        pad += [0, max_shape[dim] - t.shape[dim]]
    padded = F.pad(t, pad, value=pad_value) if any(pad) else t
    if with_grad:
        from torch.distributed.nn.functional import all_gather

        parts = list(all_gather(padded))
    else:
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.detach())
    return torch.cat([p[: int(s[0])] for p, s in zip(parts, shapes, strict=True)], dim=0)


def image_id_key(image_id: Any) -> int:
    """A stable int64 for any image id (str or int), equal across processes and runs."""
    digest = hashlib.blake2b(str(image_id).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


@torch.no_grad()
def sample_hard_negatives(
    sim: torch.Tensor, pos: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of `sim` [B, M], draw a column from softmax(sim) outside `pos` [B, M].

    Returns (indices [B], ok [B]); `ok` is False for rows whose every column is positive,
    and their index is meaningless.
    """
    ok = (~pos).any(dim=1)
    # masking before the softmax (not after) keeps a sharp temperature from underflowing
    # every negative to 0; rows without any negative get dummy weights, dropped by the caller
    logits = sim.float().masked_fill(pos, float("-inf"))
    weights = torch.where(ok[:, None], F.softmax(logits, dim=1), torch.ones_like(logits))
    return torch.multinomial(weights, 1).squeeze(1), ok


class VLPModel(nn.Module):
    """Image tower + BLIP text encoder (unimodal and fusion) + caption decoder + ITC/ITM heads."""

    def __init__(
        self,
        cfg: ModelConfig,
        tokenizer: PreTrainedTokenizerBase,
        image_tower: ImageTower,
        text_encoder: nn.Module,
        text_decoder: nn.Module,
        temperature: float = 0.07,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.image_tower = image_tower
        self.text_encoder = text_encoder
        self.text_decoder = text_decoder
        hidden = text_encoder.config.hidden_size
        self.vision_proj = nn.Linear(hidden, cfg.embed_dim)
        self.text_proj = nn.Linear(hidden, cfg.embed_dim)
        self.itm_head = nn.Linear(hidden, 2)
        self.temp = nn.Parameter(torch.tensor(float(temperature)))
        self.loss_weights: dict[str, float] = dict(DEFAULT_WEIGHTS)
        self.enc_token_id = tokenizer.convert_tokens_to_ids(ENC_TOKEN)
        self.dec_token_id = tokenizer.convert_tokens_to_ids(DEC_TOKEN)

    # ------------------------------------------------------------------ encoders
    def encode_image(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images [B,3,S,S] -> (image_embeds [B,N,H], image_feat [B,E] L2-normalised)."""
        image_embeds = self.image_tower(pixel_values)
        image_feat = F.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1)
        return image_embeds, image_feat

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
    def lm_loss(
        self,
        cond_embeds: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cond_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Teacher-forced next-token cross-entropy of texts given a conditioning sequence.

        `cond_embeds` [B,N,H] is what the decoder cross-attends to: image tokens for captions,
        fused question states for VQA answers. Position 0 of `input_ids` ([CLS]) is replaced
        by [DEC]; padding is ignored; the mean is over predicted tokens, [SEP] included.
        """
        ids = input_ids.clone()
        ids[:, 0] = self.dec_token_id
        labels = ids.masked_fill(attention_mask == 0, -100)
        if cond_mask is None:
            cond_mask = torch.ones(cond_embeds.shape[:-1], dtype=torch.long, device=ids.device)
        out = self.text_decoder(
            input_ids=ids,
            attention_mask=attention_mask,
            encoder_hidden_states=cond_embeds,
            encoder_attention_mask=cond_mask,
            labels=labels,
        )
        return out.loss

    def caption_loss(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Captioning LM loss (scalar) of tokenised captions given their images."""
        image_embeds, _ = self.encode_image(pixel_values)
        return self.lm_loss(image_embeds, input_ids, attention_mask)

    @torch.no_grad()
    def generate_text(
        self,
        cond_embeds: torch.Tensor,
        cond_mask: torch.Tensor | None = None,
        num_beams: int = 1,
        max_length: int = 20,
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

    @torch.no_grad()
    def generate_captions(
        self, pixel_values: torch.Tensor, num_beams: int = 3, max_length: int = 20
    ) -> list[str]:
        """Captions for a batch of images (greedy if num_beams == 1, else beam search)."""
        image_embeds, _ = self.encode_image(pixel_values)
        return self.generate_text(image_embeds, num_beams=num_beams, max_length=max_length)

    # ------------------------------------------------------------------ pretraining
    def clamp_temperature(self) -> None:
        """Keep the learnable ITC temperature in [0.001, 0.5] (in place, as ALBEF)."""
        with torch.no_grad():
            self.temp.clamp_(TEMP_MIN, TEMP_MAX)

    def pretrain_losses(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_ids: torch.Tensor,
        weights: dict[str, float] | None = None,
    ) -> dict[str, torch.Tensor]:
        """ITC + ITM + LM on a batch of (image, caption) pairs.

        Returns {"loss": weighted sum, "loss_itc", "loss_itm", "loss_lm"}; an objective whose
        weight is 0 is not computed and its key is absent. `image_ids` [B] int64 (see
        `image_id_key`) marks captions of the same image, which count as positives for ITC
        and are never drawn as ITM negatives. Under torch.distributed (world > 1) ITC and the
        ITM negative pool span all processes' batches, gradients included.
        """
        w = {**DEFAULT_WEIGHTS, **(self.loss_weights if weights is None else weights)}
        unknown = set(w) - set(DEFAULT_WEIGHTS)
        if unknown:
            raise ConfigError(f"unknown pretraining objective(s) {sorted(unknown)}")
        use = {k: float(v) != 0.0 for k, v in w.items()}
        if not any(use.values()):
            raise ConfigError("every pretraining objective has weight 0")
        self.clamp_temperature()
        image_embeds, image_feat = self.encode_image(pixel_values)
        out: dict[str, torch.Tensor] = {}

        if use["itc"] or use["itm"]:
            with torch.set_grad_enabled(torch.is_grad_enabled() and use["itc"]):
                _, text_feat = self.encode_text(input_ids, attention_mask)
                image_feat_all = _gather_rows(image_feat, with_grad=True)
                text_feat_all = _gather_rows(text_feat, with_grad=True)
            ids_all = _gather_rows(image_ids, with_grad=False)
            pos = image_ids.unsqueeze(1) == ids_all.unsqueeze(0)  # [B, B_world]
            sim_i2t = (image_feat @ text_feat_all.t()).float() / self.temp
            sim_t2i = (text_feat @ image_feat_all.t()).float() / self.temp
            if use["itc"]:
                targets = pos.float() / pos.float().sum(dim=1, keepdim=True)
                loss_i2t = -(F.log_softmax(sim_i2t, dim=1) * targets).sum(dim=1).mean()
                loss_t2i = -(F.log_softmax(sim_t2i, dim=1) * targets).sum(dim=1).mean()
                out["loss_itc"] = (loss_i2t + loss_t2i) / 2
            if use["itm"]:
                out["loss_itm"] = self._itm_loss(
                    image_embeds, input_ids, attention_mask, sim_i2t.detach(), sim_t2i.detach(), pos
                )
        if use["lm"]:
            out["loss_lm"] = self.lm_loss(image_embeds, input_ids, attention_mask)
        out["loss"] = sum(w[k] * out[f"loss_{k}"] for k in DEFAULT_WEIGHTS if use[k])
        return out

    def _itm_loss(
        self,
        image_embeds: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        sim_i2t: torch.Tensor,
        sim_t2i: torch.Tensor,
        pos: torch.Tensor,
    ) -> torch.Tensor:
        """Binary ITM: each positive pair, plus a hard negative text per image and image per text.

        Negatives are drawn from softmax(ITC similarity) over the (world) batch, excluding
        captions of the same image; rows with no eligible negative get none.
        """
        b = input_ids.shape[0]
        image_embeds_all = _gather_rows(image_embeds, with_grad=True)
        pad_id = self.tokenizer.pad_token_id or 0
        ids_all = _gather_rows(input_ids, with_grad=False, pad_value=pad_id)
        mask_all = _gather_rows(attention_mask, with_grad=False, pad_value=0)
        t = ids_all.shape[1]  # local ids padded to the world's longest
        ids = F.pad(input_ids, (0, t - input_ids.shape[1]), value=pad_id)
        mask = F.pad(attention_mask, (0, t - attention_mask.shape[1]), value=0)

        neg_img, ok_t = sample_hard_negatives(sim_t2i, pos)
        neg_txt, ok_i = sample_hard_negatives(sim_i2t, pos)

        pair_images = torch.cat([image_embeds, image_embeds_all[neg_img][ok_t], image_embeds[ok_i]])
        pair_ids = torch.cat([ids, ids[ok_t], ids_all[neg_txt][ok_i]])
        pair_mask = torch.cat([mask, mask[ok_t], mask_all[neg_txt][ok_i]])
        logits = self.itm_logits(pair_images, pair_ids, pair_mask)
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        labels[:b] = 1
        return F.cross_entropy(logits.float(), labels)

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_ids: torch.Tensor,
        weights: dict[str, float] | None = None,
    ) -> dict[str, torch.Tensor]:
        """`pretrain_losses` with `self.loss_weights` unless `weights` is given (for the loop)."""
        return self.pretrain_losses(pixel_values, input_ids, attention_mask, image_ids, weights)

    # ------------------------------------------------------------------ text helpers
    def tokenize(
        self, texts: Sequence[str], max_length: int | None = None
    ) -> dict[str, torch.Tensor]:
        """Tokenise texts to {"input_ids", "attention_mask"} (padded, truncated) on this model's device."""
        enc = self.tokenizer(
            list(texts),
            padding="longest",
            truncation=True,
            max_length=max_length or self.cfg.max_text_length,
            return_tensors="pt",
        )
        device = self.temp.device
        return {k: enc[k].to(device) for k in ("input_ids", "attention_mask")}

    def num_parameters(self) -> int:
        """Number of distinct parameters (tied tensors counted once)."""
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write model.safetensors + vlp_config.json + tokenizer/ into `path`, atomically."""
        from vlp.models.weights import save_weights

        meta = {
            "model": dataclasses.asdict(self.cfg),
            "text_config": self.text_encoder.config.to_dict(),
            "image_config": self.image_tower.backbone.config.to_dict(),
            "loss_weights": self.loss_weights,
        }
        with atomic_dir(Path(path), "model") as tmp:
            save_weights(self, tmp / WEIGHTS_NAME)
            (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
            self.tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, device: str | torch.device = "cpu"
    ) -> VLPModel:
        """Load a model written by `save_pretrained` (safetensors only, never pickle)."""
        from safetensors.torch import load_model
        from transformers import CONFIG_MAPPING, BlipTextConfig

        from vlp.config import ModelConfig

        p = local_dir(path, "model directory")
        if not (p / CONFIG_NAME).exists() or not (p / WEIGHTS_NAME).exists():
            raise ConfigError(
                f"{p}: not a saved VLP model (needs {CONFIG_NAME} and {WEIGHTS_NAME})"
            )
        meta = json.loads((p / CONFIG_NAME).read_text())
        known = {f.name for f in dataclasses.fields(ModelConfig)}
        cfg = ModelConfig(**{k: v for k, v in meta["model"].items() if k in known})
        tokenizer = load_tokenizer(p / TOKENIZER_DIR, f"{p}/{TOKENIZER_DIR}")
        text_cfg = BlipTextConfig.from_dict(meta["text_config"])
        image_cfg_dict = dict(meta["image_config"])
        image_cfg = CONFIG_MAPPING[image_cfg_dict.pop("model_type")].from_dict(image_cfg_dict)
        model = _assemble(
            cfg,
            tokenizer,
            ImageTower(backbone_from_config(image_cfg), text_cfg.hidden_size),
            text_cfg,
        )
        model.loss_weights = dict(meta.get("loss_weights", DEFAULT_WEIGHTS))
        load_model(model, str(p / WEIGHTS_NAME), strict=True, device=str(device))
        return model.to(device)


def _assemble(
    cfg: ModelConfig,
    tokenizer: PreTrainedTokenizerBase,
    image_tower: ImageTower,
    text_cfg: Any,
    text_pretrained: str | None = None,
    temperature: float = 0.07,
) -> VLPModel:
    from transformers import BlipTextLMHeadModel, BlipTextModel

    if text_pretrained:
        src_vocab = text_cfg.vocab_size
        encoder = BlipTextModel.from_pretrained(
            text_pretrained, config=text_cfg, add_pooling_layer=False, local_files_only=True
        )
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
    model_cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, temperature: float = 0.07
) -> VLPModel:
    """A VLPModel for `model_cfg`: tiny from-scratch towers, or those named by `*_pretrained`.

    The text vocabulary is the tokenizer's (`len(tokenizer)`), not `model_cfg.vocab_size`.
    `temperature` initialises the learnable ITC temperature (pretrain.temperature).
    """
    if model_cfg.text_pretrained:
        text_cfg = text_config_from_pretrained(model_cfg.text_pretrained, model_cfg, tokenizer)
    else:
        text_cfg = text_config(model_cfg, tokenizer)
    image_tower = build_image_tower(model_cfg, text_cfg.hidden_size)
    return _assemble(
        model_cfg, tokenizer, image_tower, text_cfg, model_cfg.text_pretrained, temperature
    )


def make_pretrain_collate(
    tokenizer: PreTrainedTokenizerBase, max_length: int
) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
    """Collate PairsDataset items into {pixel_values, input_ids, attention_mask, image_ids}.

    Captions are padded to the batch's longest (at most `max_length` tokens); image ids
    become stable int64 keys (`image_id_key`) so equal images match across processes.
    """

    def collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = collate_images_and_texts(items, "caption", tokenizer, max_length)
        batch["image_ids"] = torch.tensor([image_id_key(it["image_id"]) for it in items])
        return batch

    return collate


def collate_images_and_texts(
    items: list[dict[str, Any]], text_key: str, tokenizer: Any, max_length: int
) -> dict[str, torch.Tensor]:
    """Stack items' pixel_values and tokenize their `text_key` texts, padded to the longest."""
    enc = tokenizer(
        [it[text_key] for it in items],
        padding="longest",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    return {
        "pixel_values": torch.stack([it["pixel_values"] for it in items]),
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
    }
