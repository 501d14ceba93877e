"""Training settings for the loop tests: every knob spelled out, `over` applied."""

from __future__ import annotations

from vlp.train.loop import TrainSettings

BASE = dict(
    epochs=1,
    max_steps=-1,
    batch_size=32,
    grad_accum_steps=1,
    lr=1e-3,
    weight_decay=0.0,
    warmup_steps=0,
    max_grad_norm=1.0,
    precision="auto",
    device="auto",
    checkpoint_every=0,
    log_every=10,
    seed=0,
    num_workers=0,
    gradient_checkpointing=False,
    compile=False,
)


def train_settings(**over: object) -> TrainSettings:
    return TrainSettings(**{**BASE, **over})
