"""Text-to-image generation: a diffusion generator conditioned on a pretrained text encoder.

The generator (`generator.Generator`) is vlp's own (`model`: a diffusers UNet conditioned on
the vlp model's text token states) or, with `init_from`, a local diffusers text-to-image
pipeline directory finetuned in full or with LoRA (`diffusers_pipeline`). The torch side,
re-ranking of sampled candidates by the pretrained model (DALL-E) and scoring are in `task`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from vlp.tasks.spec import FinetuneBudget, Task

# How the best of `num_candidates` samples per prompt is chosen: the model's ITM head (the
# fusion family), its ITC cosine, or none (the first sample).
Rerank = Literal["itm", "itc", "none"]


@dataclass
class GenerationConfig(FinetuneBudget):
    """`finetune.generation`: training budget, the generator and its inference settings."""

    init_from: str | None  # a local diffusers text-to-image pipeline directory; None: vlp's own
    lora_rank: int  # with init_from: LoRA adapters of this rank on the denoiser; 0: full finetune
    lora_alpha: int  # LoRA scaling numerator (scale = alpha / rank)
    train_text_encoder: bool  # also update the conditioning text encoder
    cond_dropout: float  # fraction of training rows whose condition is dropped (CFG)
    vae_from: str | None  # a local AutoencoderKL directory: denoise its latents; None: pixels
    image_size: int | None  # side of the generated images; None: data.image_size
    block_out_channels: list[int]  # vlp's own UNet: channels per resolution level
    layers_per_block: int
    attention_head_dim: int
    train_timesteps: int  # noise schedule length in training
    # the generators check these three (vlp.tasks.generation.model, diffusers_pipeline)
    beta_schedule: str  # diffusers' linear | scaled_linear | squaredcos_cap_v2
    prediction_type: str  # what the denoiser predicts: epsilon | v_prediction
    sampler: str  # ddim, or DPM-Solver++: dpm_solver (vlp's own UNet), dpm (a pipeline)
    sample_steps: int  # sampler steps per image
    guidance_scale: float  # classifier-free guidance; 1: conditional prediction alone
    num_candidates: int  # samples per prompt re-ranked by `rerank`
    rerank: Rerank
    sample_seed: int  # seeds sampling (evaluation, serving): the same prompts give the same images


# Images cross the generator protocol in [-1, 1]: an image transform's mean and std for that.
UNIT_RANGE = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}

# The inference settings `task.json` records (its `steps` are the training's optimizer steps);
# a request may change sample_steps and guidance_scale.
SAMPLING = ("sampler", "sample_steps", "guidance_scale", "num_candidates", "rerank", "sample_seed")

TASK = Task(
    name="generation",
    config=GenerationConfig,
    settings=("generator", *SAMPLING),
    primary_metric="exact_match",
    plot="scores",
    plot_columns=("metric", "score"),
    inputs=(("prompt", "string"),),
    output=("image", "string"),
    implementation="vlp.tasks.generation.task",
    evaluate_options=("generation_prompts", "generation_clip_dir", "generation_inception_weights"),
    request_params=(("sample_steps", "long"), ("guidance_scale", "double")),
    # captions that are no shapes scenes (photos) have no exact match: the pretrained model's
    # agreement of image and prompt gates promotion instead
    fallback_metric="itc_score",
    lower_is_better=("frechet_distance_image_tower", "frechet_distance_inception"),
)
