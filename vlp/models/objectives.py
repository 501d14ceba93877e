"""Training objectives of the VLP model, as ALBEF/BLIP: ITC, ITM with hard negatives, LM.

- ITC: image-text contrastive loss with the model's learnable temperature; captions of the
  same image are all positives of that image (the target spreads evenly over them).
- ITM: binary match / no-match on the fusion encoder's [ENC] state, for every positive pair
  plus one hard negative text per image and one hard negative image per text, drawn from
  softmax(ITC similarity).
- LM: teacher-forced next-token cross-entropy of the caption decoder.

Under torch.distributed (world > 1) ITC and the ITM negative pool span every process's
batch, gradients included (`gather_rows`). With `local_loss` (the default) each process scores
only its own rows against the gathered world batch, [B, B_world] logits, memory linear in the
world batch (OpenCLIP's `--local-loss --gather-with-grad`); without it every process scores the
whole [B_world, B_world] matrix. Both give the same parameter gradients after DDP's average.

A stage chooses what to train with `ObjectiveWeights` and trains `VLPObjective(model,
weights)`, a module whose `forward(**batch)` returns the losses the training loop expects.
The dual encoder (`CLIPDualEncoder`) trains `CLIPObjective`: the same ITC, with CLIP's
logit scale as the temperature, and nothing else. VQA finetuning trains `VQAObjective`: the
soft-score BCE of a VQA model's answer logits.
"""

from __future__ import annotations

import math
from dataclasses import astuple, dataclass, fields
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

from vlp.errors import ConfigError

if TYPE_CHECKING:
    from vlp.models.vlp_model import VLPModel

TEMP_MIN, TEMP_MAX = 0.001, 0.5
# CLIP caps the logit scale at 100 (exp of the learned log-scale), as the paper does
LOGIT_SCALE_MAX = math.log(100.0)


@dataclass(frozen=True)
class ObjectiveWeights:
    """Weight of each objective in the summed loss; an objective weighted 0 is not computed."""

    itc: float
    itm: float
    lm: float

    def __post_init__(self) -> None:
        if not any(float(w) != 0.0 for w in astuple(self)):
            shown = ", ".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self))
            raise ConfigError(f"objective weights ({shown}): at least one must be non-zero")


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_rows(t: torch.Tensor, with_grad: bool, pad_value: int | float = 0) -> torch.Tensor:
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


@torch.no_grad()
def sample_hard_negatives(
    sim: torch.Tensor, pos: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of `sim` [B, M], draw a column from softmax(sim) outside `pos` [B, M].

    Returns (indices [B], ok [B]); `ok` is False for rows whose every column is positive,
    and their index is meaningless. Draws from torch's global RNG.
    """
    ok = (~pos).any(dim=1)
    # masking before the softmax (not after) keeps a sharp temperature from underflowing
    # every negative to 0; rows without any negative get dummy weights, dropped by the caller
    logits = sim.float().masked_fill(pos, float("-inf"))
    weights = torch.where(ok[:, None], F.softmax(logits, dim=1), torch.ones_like(logits))
    return torch.multinomial(weights, 1).squeeze(1), ok


def clamp_temperature(model: VLPModel) -> None:
    """Keep the learnable ITC temperature in [0.001, 0.5] (in place, as ALBEF)."""
    with torch.no_grad():
        model.temp.clamp_(TEMP_MIN, TEMP_MAX)


def contrastive_logits(
    image_feat: torch.Tensor, text_feat: torch.Tensor, image_ids: torch.Tensor, temp: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sim_i2t, sim_t2i, pos) [B, B_world] of the local rows against the whole (world) batch.

    Features are gathered from every process with their gradients (`gather_rows`); the
    similarities are divided by the temperature `temp`; `pos` marks the captions of the
    same image (`image_ids`).
    """
    image_feat_all = gather_rows(image_feat, with_grad=True)
    text_feat_all = gather_rows(text_feat, with_grad=True)
    ids_all = gather_rows(image_ids, with_grad=False)
    pos = image_ids.unsqueeze(1) == ids_all.unsqueeze(0)  # [B, B_world]
    sim_i2t = (image_feat @ text_feat_all.t()).float() / temp
    sim_t2i = (text_feat @ image_feat_all.t()).float() / temp
    return sim_i2t, sim_t2i, pos


def world_itc_loss(
    image_feat: torch.Tensor, text_feat: torch.Tensor, image_ids: torch.Tensor, temp: torch.Tensor
) -> torch.Tensor:
    """ITC of the whole world batch's [B_world, B_world] similarities, on every rank.

    What `runtime.local_loss: false` trains: the same gradients as the local rows'
    `contrastive_logits` + `itc_loss` (the gather's backward sums the ranks' gradients and
    DDP averages them), with logit memory quadratic instead of linear in the world batch.
    """
    image_feat_all = gather_rows(image_feat, with_grad=True)
    text_feat_all = gather_rows(text_feat, with_grad=True)
    ids_all = gather_rows(image_ids, with_grad=False)
    sim_all = (image_feat_all @ text_feat_all.t()).float() / temp
    pos_all = ids_all.unsqueeze(1) == ids_all.unsqueeze(0)  # [B_world, B_world]
    return itc_loss(sim_all, sim_all.t(), pos_all)


def itc_loss(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Symmetric contrastive loss of similarity logits [B, B_world] (already / temperature).

    `pos` [B, B_world] marks the positives of each local row; the target spreads evenly
    over them.
    """
    targets = pos.float() / pos.float().sum(dim=1, keepdim=True)
    loss_i2t = -(F.log_softmax(sim_i2t, dim=1) * targets).sum(dim=1).mean()
    loss_t2i = -(F.log_softmax(sim_t2i, dim=1) * targets).sum(dim=1).mean()
    return (loss_i2t + loss_t2i) / 2


def itm_loss(
    model: VLPModel,
    image_embeds: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    sim_i2t: torch.Tensor,
    sim_t2i: torch.Tensor,
    pos: torch.Tensor,
) -> torch.Tensor:
    """Binary ITM: each positive pair, plus a hard negative text per image and image per text.

    Negatives are drawn from softmax(ITC similarity) [B, B_world] over the (world) batch,
    excluding `pos` (captions of the same image); rows with no eligible negative get none.
    Draws from torch's global RNG: texts' negative images first, then images' negative texts.
    """
    b = input_ids.shape[0]
    image_embeds_all = gather_rows(image_embeds, with_grad=True)
    pad_id = model.tokenizer.pad_token_id or 0
    ids_all = gather_rows(input_ids, with_grad=False, pad_value=pad_id)
    mask_all = gather_rows(attention_mask, with_grad=False, pad_value=0)
    t = ids_all.shape[1]  # local ids padded to the world's longest
    ids = F.pad(input_ids, (0, t - input_ids.shape[1]), value=pad_id)
    mask = F.pad(attention_mask, (0, t - attention_mask.shape[1]), value=0)

    neg_img, ok_t = sample_hard_negatives(sim_t2i, pos)
    neg_txt, ok_i = sample_hard_negatives(sim_i2t, pos)

    pair_images = torch.cat([image_embeds, image_embeds_all[neg_img][ok_t], image_embeds[ok_i]])
    pair_ids = torch.cat([ids, ids[ok_t], ids_all[neg_txt][ok_i]])
    pair_mask = torch.cat([mask, mask[ok_t], mask_all[neg_txt][ok_i]])
    logits = model.itm_logits(pair_images, pair_ids, pair_mask)
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    labels[:b] = 1
    return F.cross_entropy(logits.float(), labels)


def lm_loss(
    model: VLPModel,
    cond_embeds: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    cond_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Teacher-forced next-token cross-entropy of texts given a conditioning sequence.

    `cond_embeds` [B,N,H] is what the decoder cross-attends to (see
    `VLPModel.decoder_logits`). Padding is ignored; the mean is over predicted tokens,
    [SEP] included, with the decoder config's label smoothing (0 unless a checkpoint sets it).
    """
    logits = model.decoder_logits(cond_embeds, input_ids, attention_mask, cond_mask)
    # position t predicts token t+1; the first token ([DEC]) is never a target
    predicted = logits[:, :-1, :].contiguous()
    targets = input_ids.masked_fill(attention_mask == 0, -100)[:, 1:].contiguous()
    return F.cross_entropy(
        predicted.view(-1, predicted.shape[-1]),
        targets.view(-1),
        label_smoothing=model.text_decoder.config.label_smoothing,
    )


class VLPObjective(nn.Module):
    """A VLPModel trained with ITC, ITM and LM in the proportions of `weights`.

    `forward(**batch)` takes a `vlp.data.torch_data.make_pretrain_collate` batch and returns
    {"loss": weighted sum, "loss_itc", "loss_itm", "loss_lm"}; the key of an objective
    weighted 0 is absent. The model is a submodule: training this module trains it.
    """

    def __init__(self, model: VLPModel, weights: ObjectiveWeights, local_loss: bool) -> None:
        super().__init__()
        self.model = model
        self.weights = weights
        self.local_loss = local_loss  # runtime.local_loss

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_ids: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Losses of a batch of (image, caption) pairs.

        `image_ids` [B] int64 (`vlp.data.torch_data.image_id_key`) marks captions of the
        same image, which count as positives for ITC and are never drawn as ITM negatives.
        """
        model, w = self.model, self.weights
        use = {f.name: float(getattr(w, f.name)) != 0.0 for f in fields(w)}
        clamp_temperature(model)
        image_embeds, image_feat = model.encode_image(pixel_values)
        out: dict[str, torch.Tensor] = {}

        if use["itc"] or use["itm"]:
            with torch.set_grad_enabled(torch.is_grad_enabled() and use["itc"]):
                _, text_feat = model.encode_text(input_ids, attention_mask)
                sim_i2t, sim_t2i, pos = contrastive_logits(
                    image_feat, text_feat, image_ids, model.temp
                )
            if use["itc"] and self.local_loss:
                out["loss_itc"] = itc_loss(sim_i2t, sim_t2i, pos)
            elif use["itc"]:
                out["loss_itc"] = world_itc_loss(image_feat, text_feat, image_ids, model.temp)
            if use["itm"]:
                out["loss_itm"] = itm_loss(
                    model,
                    image_embeds,
                    input_ids,
                    attention_mask,
                    sim_i2t.detach(),
                    sim_t2i.detach(),
                    pos,
                )
        if use["lm"]:
            out["loss_lm"] = lm_loss(model, image_embeds, input_ids, attention_mask)
        out["loss"] = sum(getattr(w, k) * out[f"loss_{k}"] for k in use if use[k])
        return out


class CLIPObjective(nn.Module):
    """A `CLIPDualEncoder` trained with CLIP's symmetric contrastive loss, weighted `weight`.

    The loss is vlp's ITC (`contrastive_logits` + `itc_loss`: the world batch under DDP,
    captions of the same image all positives) with CLIP's learnable logit scale as the
    inverse temperature, clamped to at most 100 before every step. `forward(**batch)` takes
    a `make_pretrain_collate` batch and returns {"loss", "loss_itc"}.
    """

    def __init__(self, model: nn.Module, weight: float, local_loss: bool) -> None:
        super().__init__()
        self.local_loss = local_loss  # runtime.local_loss
        if float(weight) == 0.0:
            raise ConfigError("the clip family trains the contrastive loss alone: its weight is 0")
        self.model = model
        self.weight = float(weight)

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_ids: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        model = self.model
        clamp_logit_scale(model)
        _, image_feat = model.encode_image(pixel_values)
        _, text_feat = model.encode_text(input_ids, attention_mask)
        if self.local_loss:
            loss = itc_loss(*contrastive_logits(image_feat, text_feat, image_ids, model.temp))
        else:
            loss = world_itc_loss(image_feat, text_feat, image_ids, model.temp)
        return {"loss": self.weight * loss, "loss_itc": loss}


class VQAObjective(nn.Module):
    """A VQA model (`vlp.tasks.vqa.model.VQAModel`) trained with soft-score BCE.

    `forward(**batch)` takes a `make_vqa_collate` batch and returns {"loss", "loss_vqa"}.
    The model's `lr_multipliers` carry over to its parameters here.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.lr_multipliers = {
            f"model.{prefix}": f for prefix, f in getattr(model, "lr_multipliers", {}).items()
        }

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        targets: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        logits = self.model(pixel_values, input_ids, attention_mask).float()
        # Summed over answers (mean over the batch), as UNITER/ALBEF scale VQA BCE: a plain
        # mean over thousands of mostly-zero targets would shrink the gradient A-fold.
        loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / len(logits)
        return {"loss": loss, "loss_vqa": loss.detach()}


def clamp_logit_scale(model: nn.Module) -> None:
    """Keep the learnable logit scale in [0, ln 100] (in place, as CLIP)."""
    with torch.no_grad():
        model.logit_scale.clamp_(0.0, LOGIT_SCALE_MAX)


class CaptionObjective(nn.Module):
    """A generative model trained with its captioning LM loss alone, weighted `weight`.

    The model's `caption_loss(pixel_values, input_ids, attention_mask)` is the mean
    next-token cross-entropy of the captions given the images. `forward(**batch)` takes a
    `make_pretrain_collate` batch and returns {"loss", "loss_lm"}.
    """

    def __init__(self, model: nn.Module, weight: float, family: str) -> None:
        super().__init__()
        if float(weight) == 0.0:
            raise ConfigError(
                f"the {family} family trains the captioning LM alone: its weight is 0"
            )
        self.model = model
        self.weight = float(weight)

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_ids: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        loss = self.model.caption_loss(pixel_values, input_ids, attention_mask)
        return {"loss": self.weight * loss, "loss_lm": loss}
