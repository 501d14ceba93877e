"""The scratch ablation of a model built from pretrained towers has fresh weights."""

from __future__ import annotations

import shutil

import torch

from tests.models.test_towers import save_bert, save_vit
from vlp.models.family import fresh_model
from vlp.models.vlp_model import build_model


def test_fresh_model_reads_no_tower_checkpoint(tiny_cfg, tmp_path):
    from vlp.models.tokenizer import build_tokenizer

    bert = save_bert(tmp_path / "bert")
    vit = save_vit(tmp_path / "vit")
    cfg = tiny_cfg(
        image_tower="vit",
        image_pretrained=str(tmp_path / "vit"),
        text_pretrained=str(tmp_path / "bert"),
    )
    torch.manual_seed(0)
    pretrained = build_model(cfg, build_tokenizer(cfg), 0.07)
    pretrained.save_pretrained(tmp_path / "model")
    # the towers' checkpoints are gone: a scratch model that reloaded them would fail
    shutil.rmtree(tmp_path / "bert")
    shutil.rmtree(tmp_path / "vit")
    torch.manual_seed(1)  # the tiny checkpoints are drawn with seed 0
    scratch = fresh_model(tmp_path / "model", temperature=0.05)

    ours, theirs = scratch.state_dict(), pretrained.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(ours[k].shape == theirs[k].shape for k in ours)
    assert scratch.temp.item() == torch.tensor(0.05).item()
    for prefix, tower in (("text_encoder.", bert), ("image_tower.backbone.", vit)):
        layers = {k: w for k, w in tower.state_dict().items() if w.ndim == 2 and "layer" in k}
        assert layers and all(prefix + k in theirs for k in layers)
        for k, own in layers.items():
            torch.testing.assert_close(theirs[prefix + k], own, rtol=0, atol=0)  # pretrained
            assert (ours[prefix + k] - own).abs().max() > 1e-2  # fresh, not the checkpoint's
