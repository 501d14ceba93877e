"""Generation's torch side: train a generator, sample and re-rank, score and serve images.

A generation model directory is a vlp model directory (the text encoder the generator is
conditioned on, and the image tower and heads that re-rank its samples) plus `generator/`,
and `task.json` with the inference settings (`SAMPLING`) and which kind of generator it
holds (`generator`: `unet` for vlp's own, `diffusers` for a user's pipeline; `kinds`).

Finetuning goes through the shared loop: `GenerationObjective` holds the generator (and the
vlp model it saves) and returns the generator's denoising loss; only
`Generator.trainable_parameters()` are updated, so the text encoder stays as pretrained
unless `train_text_encoder`. Images are the pairs' images scaled to [-1, 1] at the
generator's size.

Re-ranking as DALL-E: `num_candidates` samples per prompt, and the model keeps the one it
scores highest: `itc` the ITC cosine of (image, prompt), `itm` the pair score retrieval
re-ranks with (ITM log-odds + ITC logit; a family without an ITM head re-ranks by `itc`),
`none` the first sample.
"""

from __future__ import annotations

import base64
import dataclasses
import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vlp.errors import ConfigError, RequestError
from vlp.tasks.generation import SAMPLING, UNIT_RANGE
from vlp.tasks.predictor import Predictor as BasePredictor
from vlp.tasks.spec import TaskEval, TrainingSetup

if TYPE_CHECKING:
    from PIL import Image

    from vlp.config import Config
    from vlp.tasks.generation.generator import Generator


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How a predictor samples: its task.json settings, or a request's."""

    steps: int
    guidance_scale: float
    num_candidates: int
    rerank: str  # itm | itc | none
    seed: int

    @classmethod
    def of(cls, info: dict[str, Any]) -> Sampling:
        """The settings a generation model's task.json records."""
        return cls(
            steps=int(info["sample_steps"]),
            guidance_scale=float(info["guidance_scale"]),
            num_candidates=int(info["num_candidates"]),
            rerank=str(info["rerank"]),
            seed=int(info["sample_seed"]),
        )


def effective_rerank(rerank: str, family: str) -> str:
    """The re-ranking a model of `family` does for `finetune.generation.rerank`: itm becomes
    itc, with a note, for a family without an ITM head (a dual encoder)."""
    from vlp.models.family import get_family

    if rerank == "itm" and not get_family(family).has_itm:
        print(
            f"finetune.generation.rerank: itm ignored: the {family} family has no ITM head; "
            "candidates are re-ranked by itc"
        )
        return "itc"
    return rerank


class GenerationObjective(torch.nn.Module):
    """The training module: `forward(pixel_values, prompts) -> {"loss"}`, the denoising loss.

    Holds the vlp model (saved with the generator, re-ranking its samples) and the generator,
    or, for a generator that is no torch Module (a diffusers pipeline), the parameters it
    trains; only the generator's `trainable_parameters()` keep `requires_grad`.
    """

    def __init__(self, kind: str, generator: Generator, vlp: torch.nn.Module) -> None:
        super().__init__()
        self.kind = kind
        self.vlp = vlp
        trainable = generator.trainable_parameters()
        if isinstance(generator, torch.nn.Module):
            self.generator = generator
        else:
            self._generator = generator  # not a submodule: the loop sees its trained weights
            self.trained = torch.nn.ParameterList(trainable)
        ids = {id(p) for p in trainable}
        for p in self.parameters():
            p.requires_grad_(id(p) in ids)

    @property
    def gen(self) -> Generator:
        """The generator, whichever way it is held."""
        return self.generator if "generator" in self._modules else self._generator

    def forward(self, pixel_values: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        return {"loss": self.gen.training_loss(pixel_values, prompts)}


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Pairs -> {"pixel_values" [B, 3, S, S] in [-1, 1], "prompts" [B]}."""
    return {
        "pixel_values": torch.stack([it["pixel_values"] for it in items]),
        "prompts": [it["caption"] for it in items],
    }


def setup(cfg: Config, vlp: Any, init: str) -> TrainingSetup:
    """The generator, trained to denoise the images of `finetune.splits` given their captions."""
    from vlp.data.decode import fast_decode
    from vlp.data.images import ImageTransform
    from vlp.data.shard_stream import pairs_for_training
    from vlp.tasks.generation import kinds

    t = cfg.finetune.generation
    torch.manual_seed(cfg.seed + 2)  # the generator's init: the same for both inits
    kind = kinds.kind_of(cfg)
    generator = kinds.build(cfg, vlp)
    transform = ImageTransform(generator.image_size, cfg.images.resize, **UNIT_RANGE)
    dataset = pairs_for_training(
        cfg.data.root,
        cfg.data.shards,
        cfg.finetune.splits,
        transform,
        None,  # no crops or flips: a scene's layout is what its caption says
        seed=cfg.seed,
        shuffle_buffer=cfg.data.shuffle_buffer,
        fast_jpeg=fast_decode(cfg.images.fast_decode, training=True),
    )
    info = {
        "generator": kind,
        "generated_size": generator.image_size,
        "generated_resize": cfg.images.resize,  # how the training images were resized to it
        **{k: getattr(t, k) for k in SAMPLING},
        "rerank": effective_rerank(t.rerank, vlp.cfg.family),
    }
    return TrainingSetup(GenerationObjective(kind, generator, vlp), dataset, collate, info)


def not_applicable(cfg: Config, init: str) -> str | None:
    """Why generation cannot be finetuned from `init`: a user's pipeline has no scratch run."""
    if init == "scratch" and cfg.finetune.generation.init_from is not None:
        return (
            "finetune.generation.init_from: a diffusers pipeline is conditioned on its own text "
            "encoder, so the ablation of vlp's (pretrained vs freshly initialised) does not apply"
        )
    return None


def save(module: Any, model_dir: Path) -> None:
    """Write the vlp model and the generator (`generator/`) into a model directory."""
    from vlp.tasks.generation import kinds

    kinds.save(module.kind, module.gen, module.vlp, model_dir)


class Predictor(BasePredictor):
    """Generation: `generate(prompts)` -> the best of `num_candidates` samples per prompt."""

    def __init__(self, model: Any, info: dict[str, Any], model_dir: Path, batch_size: int = 64):
        from vlp.tasks.generation import kinds

        super().__init__(model, info, model_dir, batch_size)
        self.generator = kinds.load(str(info["generator"]), Path(model_dir), model, self.device)
        self.sampling = Sampling.of(info)
        self.has_itm = _has_itm(model)

    @torch.no_grad()
    def candidates(self, prompts: Sequence[str], sampling: Sampling) -> list[list[Image.Image]]:
        """`num_candidates` images per prompt, from one seeded draw of the generator's noise."""
        return self.generator.sample(
            list(prompts),
            num_images_per_prompt=sampling.num_candidates,
            steps=sampling.steps,
            guidance_scale=sampling.guidance_scale,
            seed=sampling.seed,
        )

    @torch.no_grad()
    def candidate_scores(
        self, prompts: Sequence[str], candidates: Sequence[Sequence[Image.Image]], how: str
    ) -> torch.Tensor:
        """[P, N] scores of each prompt's N candidates: `itc` cosine, or `itm` (ITM log-odds
        plus ITC logit, as retrieval re-ranks)."""
        from vlp.models.embed import encode_texts

        n = len(candidates[0])
        flat = [im for group in candidates for im in group]
        image_embeds, image_feat = self._image_states(flat)
        ids, mask, text_feat = encode_texts(self.model, list(prompts), self.batch_size)
        rows = torch.arange(len(prompts), device=ids.device).repeat_interleave(n)
        itc = (image_feat * text_feat[rows]).sum(-1).float()
        if how == "itc":
            return itc.view(-1, n)
        if how != "itm" or not self.has_itm:
            raise ConfigError(f"rerank: {how!r} is not a score this model gives (itc, itm)")
        itm = torch.empty_like(itc)
        for sl in self._chunks(len(flat)):
            m = mask[rows[sl]]
            t = int(m.sum(dim=1).max())
            logits = self.model.itm_logits(image_embeds[sl], ids[rows[sl], :t], m[:, :t])
            itm[sl] = (logits[:, 1] - logits[:, 0]).float()
        return (itm + itc / self.model.temp.detach().float()).view(-1, n)

    def pick(
        self, prompts: Sequence[str], candidates: Sequence[Sequence[Image.Image]], how: str
    ) -> list[int]:
        """The index of each prompt's kept candidate: its best by `how`, or 0 with `none`."""
        if how == "none" or len(candidates[0]) == 1:
            return [0] * len(candidates)
        return self.candidate_scores(prompts, candidates, how).argmax(dim=1).tolist()

    def generate(
        self, prompts: Sequence[str], sampling: Sampling | None = None
    ) -> list[Image.Image]:
        """One image per prompt: the best of its candidates (the model's own settings unless
        `sampling` is given)."""
        sampling = sampling or self.sampling
        if not prompts:
            return []
        candidates = self.candidates(prompts, sampling)
        picks = self.pick(prompts, candidates, sampling.rerank)
        return [group[i] for group, i in zip(candidates, picks, strict=True)]


def _has_itm(model: Any) -> bool:
    from vlp.models.family import get_family

    return get_family(model.cfg.family).has_itm


def evaluate(cfg: Config, predictor: Predictor, data: Path) -> TaskEval:
    """Compositional accuracy with and without re-ranking, ITC (and CLIP) score, Fréchet
    distance and a gallery, on `evaluate.generation_prompts` prompts of `evaluate.split`."""
    from vlp.tasks.generation.evaluation import score_generation

    return score_generation(cfg, predictor, data)


def _check_request(params: dict[str, Any], sampling: Sampling, limits: Any) -> Sampling:
    """The request's sampling: the model's, with its `sample_steps` / `guidance_scale` if given and
    within the `serving` limits; RequestError naming the param and limit otherwise."""
    steps = params.get("sample_steps", sampling.steps)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise RequestError(f"params sample_steps must be a positive integer, got {steps!r}")
    if steps > limits.max_generation_steps:
        raise RequestError(
            f"params sample_steps is {steps}, over the limit of {limits.max_generation_steps} "
            "(serving.max_generation_steps)"
        )
    guidance = params.get("guidance_scale", sampling.guidance_scale)
    if isinstance(guidance, bool) or not isinstance(guidance, int | float) or not guidance >= 0:
        raise RequestError(f"params guidance_scale must be a number >= 0, got {guidance!r}")
    if guidance > limits.max_guidance_scale:
        raise RequestError(
            f"params guidance_scale is {guidance}, over the limit of {limits.max_guidance_scale} "
            "(serving.max_guidance_scale)"
        )
    return dataclasses.replace(sampling, steps=steps, guidance_scale=float(guidance))


def png_base64(image: Image.Image) -> str:
    """A PNG of `image`, base64-encoded (how a served image travels in JSON)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def serve(
    predictor: Any,
    images: list[Any],
    texts: dict[str, list[str]],
    params: dict[str, Any],
    limits: Any,
) -> dict[str, list]:
    """One PNG (base64) per request row: the image generated from its prompt.

    At most `serving.max_generation_prompts` prompts; `params` may lower or raise `sample_steps` and
    `guidance_scale` within `serving.max_generation_steps` and `serving.max_guidance_scale`.
    """
    prompts = texts["prompt"]
    if len(prompts) > limits.max_generation_prompts:
        raise RequestError(
            f"request has {len(prompts)} prompts, over the limit of "
            f"{limits.max_generation_prompts} (serving.max_generation_prompts)"
        )
    sampling = _check_request(params, predictor.sampling, limits)
    return {"image": [png_base64(im) for im in predictor.generate(prompts, sampling)]}
