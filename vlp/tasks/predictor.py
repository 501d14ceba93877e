"""Inference over a finetuned task model directory: the API `load_predictor` returns."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from vlp.errors import ConfigError

if TYPE_CHECKING:
    from PIL import Image

    from vlp.models.vlp_model import VLPModel
    from vlp.tasks.vqa import VQAModel


def fit_image(img: Image.Image, size: int) -> Image.Image:
    """`img` as RGB at the model's `size` x `size` input, resized as the torch datasets do."""
    from PIL import Image

    rgb = img.convert("RGB")
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BICUBIC)
    return rgb


def pixels_from_pil(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """[N, 3, size, size] float pixels, preprocessed exactly as the torch datasets do."""
    from vlp.data.torch_data import PIXEL_MEAN, PIXEL_STD

    arrays = [np.asarray(fit_image(img, size), dtype=np.uint8) for img in images]
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
    return (pixels - PIXEL_MEAN) / PIXEL_STD


class Predictor:
    """ITC embeddings and scores of any finetuned task model; subclasses add their task."""

    def __init__(self, model: VLPModel, info: dict[str, Any], batch_size: int = 64) -> None:
        self.model = model.eval()
        self.info = info
        self.task: str = info["task"]
        self.image_size = int(info["image_size"])
        self.batch_size = batch_size

    @property
    def device(self) -> torch.device:
        return self.model.temp.device

    def _pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return pixels_from_pil(images, self.image_size).to(self.device)

    def _chunks(self, n: int) -> list[slice]:
        return [slice(s, s + self.batch_size) for s in range(0, n, self.batch_size)]

    @torch.no_grad()
    def _image_states(self, images: Sequence[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, feats = [], []
        for sl in self._chunks(len(images)):
            e, f = self.model.encode_image(self._pixels(images[sl]))
            embeds.append(e)
            feats.append(f)
        return torch.cat(embeds), torch.cat(feats)

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """L2-normalised ITC image embeddings [N, E] (float32)."""
        if not images:
            return np.zeros((0, self.model.cfg.embed_dim), dtype=np.float32)
        return self._image_states(images)[1].float().cpu().numpy()

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised ITC text embeddings [M, E] (float32)."""
        if not texts:
            return np.zeros((0, self.model.cfg.embed_dim), dtype=np.float32)
        feats = []
        for sl in self._chunks(len(texts)):
            enc = self.model.tokenize(list(texts[sl]))
            feats.append(self.model.encode_text(enc["input_ids"], enc["attention_mask"])[1])
        return torch.cat(feats).float().cpu().numpy()

    @torch.no_grad()
    def score(self, images: Sequence[Image.Image], texts: Sequence[str]) -> np.ndarray:
        """Image-text scores [N, M]; here ITC cosine similarity (retrieval re-ranks with ITM)."""
        return self.embed_images(images) @ self.embed_texts(texts).T


class RetrievalPredictor(Predictor):
    """Retrieval: `score` is ITC top-k re-ranked by ITM in both directions (k = rerank_k)."""

    @torch.no_grad()
    def score(self, images: Sequence[Image.Image], texts: Sequence[str]) -> np.ndarray:
        """[N, M] scores: ITM log-odds + ITC logit for pairs in either direction's top k.

        Pairs in neither top k get their ITC logit - 1e4 (ranked below every candidate).
        Both directions give a re-ranked pair the same score, so one matrix serves both.
        """
        from vlp.tasks.retrieval import retrieval_scores

        if not images or not texts:
            return np.zeros((len(images), len(texts)), dtype=np.float32)
        image_embeds, image_feat = self._image_states(images)
        enc = self.model.tokenize(list(texts))
        text_feat = torch.cat(
            [
                self.model.encode_text(enc["input_ids"][sl], enc["attention_mask"][sl])[1]
                for sl in self._chunks(len(texts))
            ]
        )
        s = retrieval_scores(
            self.model,
            image_embeds,
            image_feat,
            enc["input_ids"],
            enc["attention_mask"],
            text_feat,
            k=int(self.info.get("rerank_k", 16)),
            batch_size=self.batch_size * 4,
        )
        return torch.maximum(s.i2t, s.t2i).float().cpu().numpy()


class CaptioningPredictor(Predictor):
    """Captioning: beam-search captions with the decoding settings the model was evaluated with."""

    @torch.no_grad()
    def caption(self, images: Sequence[Image.Image]) -> list[str]:
        """One caption per image."""
        out: list[str] = []
        for sl in self._chunks(len(images)):
            out += self.model.generate_captions(
                self._pixels(images[sl]),
                num_beams=int(self.info.get("beam_size", 3)),
                max_length=int(self.info.get("max_length", 20)),
            )
        return out


class VQAPredictor(Predictor):
    """VQA: the answer head's best vocabulary answer per (image, question)."""

    def __init__(self, vqa: VQAModel, info: dict[str, Any], batch_size: int = 64) -> None:
        super().__init__(vqa.vlp, info, batch_size)
        self.vqa = vqa.eval()

    @torch.no_grad()
    def answer(self, images: Sequence[Image.Image], questions: Sequence[str]) -> list[str]:
        """One answer per (image, question) pair; the two lists must be equally long."""
        if len(images) != len(questions):
            raise ConfigError(f"{len(images)} images but {len(questions)} questions")
        out: list[str] = []
        for sl in self._chunks(len(images)):
            enc = self.model.tokenize(list(questions[sl]))
            out += self.vqa.predict(
                self._pixels(images[sl]), enc["input_ids"], enc["attention_mask"]
            )
        return out


def load(model_dir: Path, device: str = "cpu") -> Predictor:
    """The predictor of a finetuned task model directory (see `vlp.tasks.load_predictor`)."""
    from vlp.models.vlp_model import VLPModel
    from vlp.tasks import read_task_info

    info = read_task_info(model_dir)
    model = VLPModel.from_pretrained(model_dir, device=device)
    if info["task"] == "retrieval":
        return RetrievalPredictor(model, info)
    if info["task"] == "captioning":
        return CaptioningPredictor(model, info)
    from vlp.tasks.vqa import load_vqa_model

    vqa = load_vqa_model(model, info, model_dir)
    return VQAPredictor(vqa, info)
