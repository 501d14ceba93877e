"""The pipeline's VQA predictions scored under both accuracy protocols (vlp.metrics.vqa).

Reads the VQA results the `evaluate@vqa` stage wrote (`results/vqa/<init>.json`) and the
evaluated split's questions, scores them as the official VQA v2 script does today
(`official`) and as the copy LAVIS/BLIP/ALBEF ship does (`lavis`), and prints both accuracies
per answer type plus how many questions score differently:

    python benchmarks/bench_vqa_protocols.py [--results results/vqa/pretrained.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vlp.config import VQA_PROTOCOLS, load_config
from vlp.data.manifest import read_vqa
from vlp.metrics.vqa import question_accuracy, vqa_accuracy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--results", default="results/vqa/pretrained.json")
    args = ap.parse_args()
    cfg = load_config(args.params)
    data = Path(cfg.evaluate.data_root or cfg.data.root)
    frame = read_vqa(data, cfg.evaluate.split)
    answers = {int(q): list(a) for q, a in zip(frame["question_id"], frame["answers"], strict=True)}
    types = {
        int(q): str(t) for q, t in zip(frame["question_id"], frame["answer_type"], strict=True)
    }
    results = {r["question_id"]: r["answer"] for r in json.loads(Path(args.results).read_text())}

    report = {
        p: vqa_accuracy(results, answers, answer_types=types, protocol=p) for p in VQA_PROTOCOLS
    }
    differ = [
        q
        for q in answers
        if len({question_accuracy(results[q], answers[q], p) for p in VQA_PROTOCOLS}) > 1
    ]
    out = {p: {"overall": r["overall"], **r["perAnswerType"]} for p, r in report.items()} | {
        "questions": len(answers),
        "questions_scored_differently": len(differ),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
