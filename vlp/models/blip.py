"""transformers' BLIP checkpoints (retrieval, captioning, VQA) loaded as a VLPModel.

A local directory written by `save_pretrained` of `BlipForImageTextRetrieval`,
`BlipForConditionalGeneration` or `BlipForQuestionAnswering` maps one to one onto VLPModel:

    vision_model -> image_tower (`towers.BlipImageTower`: BlipVisionModel's last_hidden_state as is)
    text_encoder -> text_encoder          vision_proj / text_proj / itm_head -> the same
    text_decoder -> text_decoder          (VQA: the answer decoder)

BLIP's text layers cross-attend to the vision width directly, so the image tower adds no
projection, LayerNorm or positions, and `vision_proj` reads the vision width. Parts a class
lacks start as vlp starts them: the decoder from the encoder's weights (retrieval), the encoder
from the decoder's (captioning), the ITC projections and ITM head freshly initialised
(captioning, VQA). transformers' classes carry no ITC temperature (BLIP's `temp`); one stored
in the checkpoint's safetensors is used, else the caller's.

The checkpoint's tokenizer becomes the model's. BLIP's is BERT's with [DEC] (the decoder's
`bos_token_id`) and [ENC] appended; a tokenizer saved without them gets them appended in that
order (`ensure_special_tokens`), which gives BLIP's ids, and the ids are checked against the
text config. transformers' BLIP forwards take the ids as given: BLIP's callers put [ENC] first
for image-text matching and VQA questions and [DEC] first for captions and answers, as vlp's
`fuse`, `decoder_logits` and `generate_answers` do; fed such ids, transformers' ITM scores,
captions and VQA answers equal vlp's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlp.errors import ConfigError
from vlp.models.tokenizer import DEC_TOKEN, ENC_TOKEN, load_tokenizer, local_dir
from vlp.models.towers import BlipImageTower, checkpoint_model_config

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from vlp.config import ModelConfig
    from vlp.models.vlp_model import VLPModel

BLIP_CLASSES = (
    "BlipForImageTextRetrieval",
    "BlipForConditionalGeneration",
    "BlipForQuestionAnswering",
)
# The `model.image_tower` a BLIP-based model records (its tower is BLIP's own ViT).
BLIP_TOWER = "blip"


def blip_architecture(path: str | Path, key: str = "model.init_from") -> str | None:
    """The transformers BLIP class saved in `path` (config.json), or None if it holds no BLIP model.

    A BLIP config naming a class vlp does not load (e.g. the deprecated `BlipModel`) is a
    ConfigError naming `key`.
    """
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}: cannot read {config_file}: {e}") from e
    if config.get("model_type") != "blip":
        return None
    archs = [a for a in config.get("architectures") or [] if a in BLIP_CLASSES]
    if not archs:
        raise ConfigError(
            f"{key}: {path} holds a BLIP model of class {config.get('architectures')}; "
            f"expected one of {', '.join(BLIP_CLASSES)}"
        )
    return archs[0]


def checkpoint_temperature(path: Path) -> float | None:
    """The ITC temperature (`temp`) stored in the checkpoint's safetensors files, if any."""
    from safetensors import safe_open

    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            if "temp" in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                return float(f.get_tensor("temp"))
    return None


def _check_tokenizer(tok: PreTrainedTokenizerBase, text_config: Any, key: str) -> None:
    """ConfigError unless the tokenizer's special ids are those the BLIP text config uses."""
    ids = {
        f"{DEC_TOKEN} (bos_token_id)": (
            tok.convert_tokens_to_ids(DEC_TOKEN),
            text_config.bos_token_id,
        ),
        "[SEP] (sep_token_id)": (tok.sep_token_id, text_config.sep_token_id),
        "[PAD] (pad_token_id)": (tok.pad_token_id, text_config.pad_token_id),
    }
    for name, (got, want) in ids.items():
        if got != want:
            raise ConfigError(
                f"{key}: the tokenizer's {name} is {got}; the BLIP config's is {want}"
            )
    enc = tok.convert_tokens_to_ids(ENC_TOKEN)
    if len(tok) > text_config.vocab_size:
        raise ConfigError(
            f"{key}: the tokenizer has {len(tok)} tokens ({ENC_TOKEN} = {enc}), more than the "
            f"text model's vocab_size {text_config.vocab_size}"
        )


def _model_config(model_cfg: ModelConfig | None, config: Any, path: Path) -> ModelConfig:
    """`model_cfg` with the architecture fields the checkpoint decides."""
    return checkpoint_model_config(
        config,
        path,
        model_cfg,
        family="fusion",
        image_tower=BLIP_TOWER,
        embed_dim=config.image_text_hidden_size,
    )


def load_blip(
    path: str | Path,
    model_cfg: ModelConfig | None,
    temperature: float,
    key: str = "model.init_from",
) -> VLPModel:
    """A VLPModel holding the BLIP checkpoint saved in the local directory `path` (fp32).

    `model_cfg` (None: no cap) supplies what the checkpoint does not decide (`max_text_length` is capped by
    the text model's positions); the architecture fields come from the checkpoint and
    `init_from` records `path`. `temperature` initialises the ITC temperature when the
    checkpoint stores none. Seed torch first: parts the class lacks are initialised randomly.
    """
    import transformers
    from transformers import BlipTextLMHeadModel, BlipTextModel

    from vlp.models.vlp_model import VLPModel
    from vlp.models.weights import load_transformers

    p = local_dir(path, key)
    arch = blip_architecture(p, key)
    if arch is None:
        raise ConfigError(
            f"{key}: {p} holds no transformers BLIP model (config.json model_type 'blip')"
        )
    hf = load_transformers(getattr(transformers, arch), p, key)
    config = hf.config
    tokenizer = load_tokenizer(p, key)
    _check_tokenizer(tokenizer, config.text_config, key)

    text_cfg = config.text_config
    encoder = getattr(hf, "text_encoder", None)
    decoder = getattr(hf, "text_decoder", None)
    if encoder is None:  # captioning: the encoder starts as the decoder's BERT
        encoder = BlipTextModel(text_cfg, add_pooling_layer=False)
        encoder.load_state_dict(decoder.bert.state_dict())
    if decoder is None:  # retrieval: the decoder starts as the encoder (its LM head fresh)
        decoder = BlipTextLMHeadModel(text_cfg)
        decoder.bert.load_state_dict(encoder.state_dict())
    stored = checkpoint_temperature(p)
    model = VLPModel(
        _model_config(model_cfg, config, p),
        tokenizer,
        BlipImageTower(hf.vision_model),
        encoder,
        decoder,
        temperature if stored is None else stored,
    )
    for name in ("vision_proj", "text_proj", "itm_head"):
        if hasattr(hf, name):
            getattr(model, name).load_state_dict(getattr(hf, name).state_dict())
    return model.eval()
