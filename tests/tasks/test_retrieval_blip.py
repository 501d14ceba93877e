"""`rerank_score: blip` is BLIP's own retrieval evaluation, computed here with transformers'
`BlipForImageTextRetrieval` as salesforce/BLIP's `train_retrieval.py` `evaluation()` does:
ITC top-k per query, each candidate scored ITM "match" logit ([ENC] first) + cosine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.checkpoints.blip import IMAGE_SIZE, make_blip_checkpoint
from vlp.metrics.retrieval import retrieval_recall
from vlp.models.blip import load_blip
from vlp.models.embed import encode_texts
from vlp.tasks.retrieval.ranking import retrieval_scores

TEXTS = [
    "a red circle left of a blue square",
    "a red circle",
    "two stars above a green triangle",
    "two stars",
    "a small yellow square",
    "a big blue triangle below the star",
    "three circles",
    "what shape is there ?",
]
TEXT_TO_IMAGE = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
K = 3


@pytest.fixture(scope="module")
def blip(tmp_path_factory: pytest.TempPathFactory):
    import transformers

    path = make_blip_checkpoint(tmp_path_factory.mktemp("blip") / "itr")
    hf = transformers.BlipForImageTextRetrieval.from_pretrained(str(path)).eval()
    return path, hf


def _pixels() -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    return torch.rand(4, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator) * 2 - 1


@torch.no_grad()
def _blip_evaluation(path: Path, hf, pixels: torch.Tensor, k: int, texts: list[str] = TEXTS):
    """BLIP's score matrices (i2t [N, M], t2i [M, N]): -100 outside each query's top k."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    # as BLIP: padded to 35 tokens, [CLS] for the text encoder, [ENC] for matching
    text = tok(texts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    n = len(pixels)
    sims = torch.cat(
        [hf(pixel_values=pixels[i : i + 1], use_itm_head=False, **text).itm_score for i in range(n)]
    )
    ids = text["input_ids"].clone()
    ids[:, 0] = tok.convert_tokens_to_ids("[ENC]")

    def itm(image_rows: torch.Tensor, text_rows: torch.Tensor) -> torch.Tensor:
        out = hf(
            pixel_values=pixels[image_rows],
            input_ids=ids[text_rows],
            attention_mask=text["attention_mask"][text_rows],
            use_itm_head=True,
        )
        return out.itm_score[:, 1]

    i2t = torch.full((n, len(texts)), -100.0)
    for i, row in enumerate(sims):
        top_sim, top = row.topk(k)
        i2t[i, top] = itm(torch.full((k,), i), top) + top_sim
    t2i = torch.full((len(texts), n), -100.0)
    for t, row in enumerate(sims.t()):
        top_sim, top = row.topk(k)
        t2i[t, top] = itm(top, torch.full((k,), t)) + top_sim
    return sims, i2t, t2i


def _vlp_scores(path: Path, pixels: torch.Tensor, score: str, k: int = K):
    torch.manual_seed(0)
    model = load_blip(path, None, temperature=0.07)
    with torch.no_grad():
        image_embeds, image_feat = model.encode_image(pixels)
    ids, mask, text_feat = encode_texts(model, TEXTS, batch_size=3)
    return retrieval_scores(
        model, image_embeds, image_feat, ids, mask, text_feat, k, batch_size=4, score=score
    )


def test_blip_rerank_score_is_blips_evaluation(blip) -> None:
    path, hf = blip
    pixels = _pixels()
    sims, want_i2t, want_t2i = _blip_evaluation(path, hf, pixels, K)
    s = _vlp_scores(path, pixels, "blip")
    torch.testing.assert_close(s.itc, sims, atol=1e-5, rtol=0)
    for ours, theirs in ((s.i2t, want_i2t), (s.t2i.t(), want_t2i)):
        inside = theirs > -100
        assert int(inside.sum()) == K * theirs.shape[0]
        torch.testing.assert_close(ours[inside], theirs[inside], atol=1e-4, rtol=0)
        assert (ours[~inside] < -1000).all()  # below every candidate, as BLIP's -100
    # recall@K (K <= k) as BLIP's itm_eval ranks its matrices
    ours = retrieval_recall(TEXT_TO_IMAGE, s.itc, s.i2t, s.t2i)
    theirs = retrieval_recall(TEXT_TO_IMAGE, sims, want_i2t, want_t2i.t())
    for key in ("i2t_R@1", "t2i_R@1"):
        assert ours[key] == theirs[key]


def test_vlp_rerank_score_differs_from_blips(blip) -> None:
    path, hf = blip
    pixels = _pixels()
    _, want_i2t, _ = _blip_evaluation(path, hf, pixels, K)
    s = _vlp_scores(path, pixels, "vlp")
    inside = want_i2t > -100
    assert not torch.allclose(s.i2t[inside], want_i2t[inside], atol=1e-2)


def test_zeroshot_scores_candidates_as_the_option_the_task_model_or_params_say(
    blip, smoke_cfg, tmp_path: Path
) -> None:
    import json

    from tests.checkpoints.vlp import tiny_vlp_dir
    from vlp.errors import ConfigError
    from vlp.inference import load_inference
    from vlp.tasks.retrieval.task import rerank_score_for

    def score(model: Path, given: str | None) -> str:
        encoder = load_inference(smoke_cfg, model, "fp32", None).encoder
        return rerank_score_for(given, encoder.task_info, encoder.path, "vlp")

    path, _ = blip
    assert score(path, None) == "vlp" == smoke_cfg.zeroshot.rerank_score
    assert score(path, "blip") == "blip"
    with pytest.raises(ConfigError, match="--rerank-score: 'itm' is not one of vlp, blip"):
        score(path, "itm")

    task_dir = tiny_vlp_dir(smoke_cfg, tmp_path / "retrieval", rerank_k=2)
    info = json.loads((task_dir / "task.json").read_text())
    # a task model written before rerank_score existed was scored with vlp's sum
    assert score(task_dir, None) == "vlp"
    (task_dir / "task.json").write_text(json.dumps({**info, "rerank_score": "blip"}))
    assert score(task_dir, None) == "blip"
    (task_dir / "task.json").write_text(json.dumps({**info, "rerank_score": "sum"}))
    with pytest.raises(ConfigError, match="task.json: rerank_score 'sum' is not one of vlp, blip"):
        score(task_dir, None)


@pytest.mark.slow  # two zero-shot runs through the CLI
def test_vlp_zeroshot_with_blips_protocol_scores_as_blips_evaluation(
    smoke_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from PIL import Image
    from transformers import AutoImageProcessor, BlipForImageTextRetrieval

    from tests.checkpoints.blip import words_of
    from vlp.cli import main
    from vlp.data.manifest import read_pairs

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    for var in ("VLP_PARENT_RUN_ID", "VLP_PREFECT_FLOW_RUN_ID", "DVC_STAGE"):
        monkeypatch.delenv(var, raising=False)
    pairs = read_pairs(smoke_data, "test")
    path = make_blip_checkpoint(tmp_path / "blip", words=words_of(pairs["caption"]))
    hf = BlipForImageTextRetrieval.from_pretrained(str(path)).eval()
    images = pairs.drop_duplicates("image_id")
    row = {i: n for n, i in enumerate(images["image_id"])}
    proc = AutoImageProcessor.from_pretrained(str(path))
    opened = [Image.open(smoke_data / p).convert("RGB") for p in images["image_path"]]
    pixels = proc(images=opened, return_tensors="pt")["pixel_values"]
    sims, i2t, t2i = _blip_evaluation(path, hf, pixels, 5, list(pairs["caption"]))
    text_to_image = torch.tensor([row[i] for i in pairs["image_id"]])
    want = retrieval_recall(text_to_image, sims, i2t, t2i.t())

    params = ["--params", str(Path(__file__).resolve().parents[2] / "params.yaml")]
    args = [*params, "--profile", "smoke", "--set", "runtime.device=cpu", "zeroshot"]
    args += ["--model", str(path), "--data", str(smoke_data), "--precision", "fp32"]
    args += ["--rerank-k", "5", "--out", str(tmp_path / "s.json")]
    assert main([*args, "--rerank-score", "blip"]) == 0
    ours = json.loads((tmp_path / "s.json").read_text())
    for key in ("i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@5"):  # K <= k
        assert ours[key] == pytest.approx(want[key]), key
    assert main([*args, "--rerank-score", "vlp"]) == 0
    assert json.loads((tmp_path / "s.json").read_text())["itc_rsum"] == ours["itc_rsum"]
