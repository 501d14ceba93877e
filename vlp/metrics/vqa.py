"""VQA accuracy as the official VQA v2 evaluation script computes it (GT-Vision-Lab/VQA, vqaEval.py).

Two protocols, differing only in how answers are normalised before they are compared:

- `official`: the script as it is today. Newlines/tabs become spaces and the ends are stripped,
  in the prediction and in every ground-truth answer. Then, only if the question's 10
  ground-truth answers are not all identical, every ground-truth answer and the prediction go
  through punctuation handling and then digit/article handling. Against 10 identical answers
  nothing else is applied to either side, so `Yes.` scores 0 against ten `yes`.
- `lavis`: the script's earlier revision, the copy LAVIS, BLIP and ALBEF ship
  (`lavis/common/vqa_tools/vqa_eval.py`) and computed their published numbers with. The
  prediction always goes through whitespace clean-up, punctuation and digit/article handling;
  ground-truth answers are left as they are unless the 10 differ, and then get punctuation
  handling alone (no lower-casing, number words or articles).

Accuracy of a question = mean over annotators of min(1, matches among the other annotators / 3).
Aggregates are percentages rounded to 2 decimals.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Literal, get_args

from vlp.errors import ResultsError

_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = frozenset({"a", "an", "the"})
# The script's contraction table: a word spelled as on the left becomes the right.
_CONTRACTIONS = dict(
    pair.split(">")
    for pair in """
    aint>ain't arent>aren't cant>can't couldve>could've couldnt>couldn't couldn'tve>couldn't've
    couldnt've>couldn't've didnt>didn't doesnt>doesn't dont>don't hadnt>hadn't hadnt've>hadn't've
    hadn'tve>hadn't've hasnt>hasn't havent>haven't hed>he'd hed've>he'd've he'dve>he'd've hes>he's
    howd>how'd howll>how'll hows>how's Id've>I'd've I'dve>I'd've Im>I'm Ive>I've isnt>isn't
    itd>it'd itd've>it'd've it'dve>it'd've itll>it'll let's>let's maam>ma'am mightnt>mightn't
    mightnt've>mightn't've mightn'tve>mightn't've mightve>might've mustnt>mustn't mustve>must've
    neednt>needn't notve>not've oclock>o'clock oughtnt>oughtn't ow's'at>'ow's'at 'ows'at>'ow's'at
    'ow'sat>'ow's'at shant>shan't shed've>she'd've she'dve>she'd've she's>she's shouldve>should've
    shouldnt>shouldn't shouldnt've>shouldn't've shouldn'tve>shouldn't've somebody'd>somebodyd
    somebodyd've>somebody'd've somebody'dve>somebody'd've somebodyll>somebody'll
    somebodys>somebody's someoned>someone'd someoned've>someone'd've someone'dve>someone'd've
    someonell>someone'll someones>someone's somethingd>something'd somethingd've>something'd've
    something'dve>something'd've somethingll>something'll thats>that's thered>there'd
    thered've>there'd've there'dve>there'd've therere>there're theres>there's theyd>they'd
    theyd've>they'd've they'dve>they'd've theyll>they'll theyre>they're theyve>they've
    twas>'twas wasnt>wasn't wed've>we'd've we'dve>we'd've weve>we've werent>weren't
    whatll>what'll whatre>what're whats>what's whatve>what've whens>when's whered>where'd
    wheres>where's whereve>where've whod>who'd whod've>who'd've who'dve>who'd've wholl>who'll
    whos>who's whove>who've whyll>why'll whyre>why're whys>why's wont>won't wouldve>would've
    wouldnt>wouldn't wouldnt've>wouldn't've wouldn'tve>wouldn't've yall>y'all yall'll>y'all'll
    y'allll>y'all'll yall'd've>y'all'd've y'alld've>y'all'd've y'all'dve>y'all'd've youd>you'd
    youd've>you'd've you'dve>you'd've youll>you'll youre>you're youve>you've
    """.split()
)
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")  # fmt: skip
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
# A period not followed by a digit. The script passes re.UNICODE (= 32) where sub() takes
# `count`, so at most 32 such periods are removed; kept for fidelity.
_PERIOD = re.compile(r"\.(?!\d)")
_PERIOD_COUNT = 32


def process_punctuation(text: str) -> str:
    """The script's punctuation step.

    Each mark is deleted if it touches a space anywhere in the original text, or if the text
    has a comma between two digits anywhere; otherwise it becomes a space. Then periods not
    followed by a digit are deleted (at most 32).
    """
    out = text
    digit_comma = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for p in _PUNCT:
        delete = p + " " in text or " " + p in text or digit_comma
        out = out.replace(p, "" if delete else " ")
    return _PERIOD.sub("", out, count=_PERIOD_COUNT)


def process_digit_article(text: str) -> str:
    """The script's word step: lower-case, number words to digits, drop articles, restore contractions."""
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


VQAProtocol = Literal["official", "lavis"]
PROTOCOLS: tuple[str, ...] = get_args(VQAProtocol)


def check_protocol(protocol: str) -> None:
    """Raise ValueError unless `protocol` is one of PROTOCOLS."""
    if protocol not in PROTOCOLS:
        raise ValueError(
            f"unknown VQA protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)}"
        )


def _clean_whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(answer: str) -> str:
    """An answer with every normalisation step: whitespace, punctuation, digits and articles."""
    return process_digit_article(process_punctuation(_clean_whitespace(answer)))


def compared_answers(
    prediction: str, answers: list[str], protocol: VQAProtocol = "official"
) -> tuple[str, list[str]]:
    """(prediction, ground-truth answers) of one question as `protocol` compares them."""
    if protocol == "official":
        pred, gts = _clean_whitespace(prediction), [_clean_whitespace(a) for a in answers]
        if len(set(gts)) > 1:
            return normalize_answer(pred), [normalize_answer(g) for g in gts]
        return pred, gts
    check_protocol(protocol)
    pred = normalize_answer(prediction)  # lavis
    if len(set(answers)) > 1:
        return pred, [process_punctuation(a) for a in answers]
    return pred, list(answers)


def question_accuracy(
    prediction: str, answers: list[str], protocol: VQAProtocol = "official"
) -> float:
    """Accuracy in [0, 1] of one raw prediction: mean over annotators of min(1, others matching / 3)."""
    if not answers:
        raise ResultsError("a question has no ground-truth answers")
    pred, gts = compared_answers(prediction, answers, protocol)
    matches = sum(g == pred for g in gts)
    return sum(min(1.0, (matches - (g == pred)) / 3) for g in gts) / len(gts)


def aggregate_accuracies(
    accs: list[float], answer_types: list[str], question_types: list[str]
) -> dict:
    """Overall, per answer type and per question type percentages, rounded to 2 decimals."""

    def pct(values: list[float]) -> float:
        return round(100 * float(sum(values)) / len(values), 2)

    by_answer, by_question = defaultdict(list), defaultdict(list)
    for acc, at, qt in zip(accs, answer_types, question_types, strict=True):
        by_answer[at].append(acc)
        by_question[qt].append(acc)
    return {
        "overall": pct(accs),
        "perAnswerType": {k: pct(v) for k, v in by_answer.items()},
        "perQuestionType": {k: pct(v) for k, v in by_question.items()},
    }


def vqa_accuracy(
    results: dict[int, str],
    answers: dict[int, list[str]],
    answer_types: dict[int, str] | None = None,
    question_types: dict[int, str] | None = None,
    protocol: VQAProtocol = "official",
) -> dict:
    """VQA v2 accuracy of predicted answers keyed by question id.

    `answers` maps every question id to its (10) ground-truth answers; the results must cover
    exactly those ids. Types default to "all". Returns {"overall", "perAnswerType",
    "perQuestionType"} in percent, under `protocol` (module docstring).
    """
    missing = [q for q in answers if q not in results]
    extra = [q for q in results if q not in answers]
    if missing:
        raise ResultsError(f"no answer for question_id {missing[0]} ({len(missing)} questions)")
    if extra:
        raise ResultsError(f"question_id {extra[0]} is not in the annotations ({len(extra)} ids)")
    if not answers:
        raise ResultsError("no questions to score")
    check_protocol(protocol)
    ids = list(answers)
    accs = [question_accuracy(results[q], answers[q], protocol) for q in ids]
    ats = [(answer_types or {}).get(q, "all") for q in ids]
    qts = [(question_types or {}).get(q, "all") for q in ids]
    return aggregate_accuracies(accs, ats, qts)
