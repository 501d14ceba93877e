"""PTB tokenisation equals the COCO toolkit's (Stanford PTBTokenizer + punctuation drop)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlp.metrics.ptb import ptb_tokenize, tokenize_caption


def test_toolkit_examples(coco_conformance: Path) -> None:
    examples = json.loads((coco_conformance / "ptb_tokenizer_examples.json").read_text())
    assert examples
    for ex in examples:
        assert tokenize_caption(ex["raw"]) == ex["ptb_tokenized"], ex["raw"]


# Expected outputs produced by the toolkit's Java tokenizer (stanford-corenlp 3.4.1).
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("The dogs' bowls are empty.", "the dogs bowls are empty"),
        ("Cannot go. Won't go. Shouldn't go.", "can not go wo n't go should n't go"),
        ("They're gonna wanna gotta do it", "they 're gon na wan na got ta do it"),
        ("A 3-year-old boy in a t-shirt.", "a 3-year-old boy in a t-shirt"),
        ("A sign that says 50% off, $10.00 each.", "a sign that says 50 % off $ 10.00 each"),
        ("There are 1,000 birds and 2.5 cats.", "there are 1,000 birds and 2.5 cats"),
        ("An o'clock sign and rock'n'roll music", "an o'clock sign and rock 'n' roll music"),
        ("The cat's-eye marble", "the cat 's eye marble"),
        ("A kid's toy-car on a mat,and a cup", "a kid 's toy-car on a mat and a cup"),
        ("What?! Really??", "what ?! really ??"),
        ("vitamin c. and more", "vitamin c. and more"),
        ("a cat on no. 5 train", "a cat on no. 5 train"),
        ("ready to bat.,", "ready to bat."),
        ("A 20-foot tall AT&T sign at&t", "a 20-foot tall at&t sign at & t"),
        ("refrigerator/freezer combo", "refrigerator/freezer combo"),
        ("A man\u2014with a hat\u2013runs \u201cfast\u201d", "a man with a hat runs fast"),
        ("It's 3 o'clock. Y'all'd like it.", "it 's 3 o'clock y' all 'd like it"),
        ("platform 9 3/4 #hashtag #12", "platform 9\u00a03/4 #hashtag # 12"),
        ("a hot dog :) and :D", "a hot dog :-rrb- and :d"),
    ],
)
def test_matches_java_tokenizer(raw: str, expected: str) -> None:
    assert tokenize_caption(raw) == expected


def test_punctuation_tokens_before_dropping() -> None:
    assert ptb_tokenize('He said, "Hi (there)."') == [
        "he", "said", ",", "''", "hi", "-lrb-", "there", "-rrb-", ".", "''",
    ]  # fmt: skip
