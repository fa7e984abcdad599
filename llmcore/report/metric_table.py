"""Every metric's direction and unit, declared once: the report card, its figures and ``llmcore compare`` read them.

A metric is named as a stage writes it: a ``metrics.json`` key, flattened with dots (``test.accuracy``,
``compare.rouge_l.diff_mean``), or a dvclive curve (``val/loss``). ``spec(name, stage)`` gives its row of
``TABLE``: the first whose stage and name patterns both match. A name no row matches is a setting, a size or a
count (``beta``, ``steps``, ``n_items``): direction 0, never marked better or worse.

What a loss means depends on the stage: the language-model stages (pretrain, import, instruct, and evaluate's
loss on the reference answers) report next-token cross-entropy in nats per token, whose exponential is a
perplexity; the classifier's loss is a cross-entropy per message and DPO's a loss per preference pair, and
``exp`` of either is no perplexity (their ``val/ppl`` curves, logged by the shared training loop, are not drawn).
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Spec:
    direction: int  # +1 higher is better, -1 lower is better, 0 neither (a setting, a count, an interval bound)
    unit: str  # for axis labels and tables ("" when there is none to give)
    lm_loss: bool = False  # a language model's next-token loss: exp(loss) is a perplexity
    plot: bool = True  # False: a curve not worth drawing (the perplexity of something that is not a language model)

    @property
    def better(self) -> str:
        return {1: "higher", -1: "lower"}.get(self.direction, "")


_LOSS = r"(^|[._/])(dpo_)?loss(_avg)?$"  # val_loss, train/loss_avg, test_response_loss, val_dpo_loss
_PPL = r"(^|[._/])(ppl|perplexity)$"
_LM = "^(pretrain|import|instruct|evaluate)$"

# (stage pattern, name pattern, spec): the first row that matches both decides (re.search; "" matches any stage)
TABLE: list[tuple[str, str, Spec]] = [
    # not results: an interval's bounds, spreads, starting points, the baselines a stage records beside its result
    ("", r"ci95_(low|high)$|(^|[._])std$|_stderr$|_start$|^(unigram|bigram)_val_loss$|^copy_prompt", Spec(0, "")),
    # losses: the unit is the stage's
    ("^classify$", _LOSS, Spec(-1, "nats/message")),
    ("^align$", _LOSS, Spec(-1, "nats/pair")),
    (_LM, _LOSS, Spec(-1, "nats/token", lm_loss=True)),
    ("", _LOSS, Spec(-1, "")),  # another stage's loss: lower is better, its unit unknown here
    ("^(classify|align)$", _PPL, Spec(0, "", plot=False)),
    ("", _PPL, Spec(-1, "perplexity")),
    ("", r"bpb$|bits_per_byte$", Spec(-1, "bits/byte")),
    ("", r"(^|[._])bytes_per_token$", Spec(1, "bytes/token")),
    # DPO: the policy should raise the chosen answer's implicit reward and lower the rejected one's
    ("", r"chosen_reward$", Spec(1, "β·log-ratio")),
    ("", r"rejected_reward$", Spec(-1, "β·log-ratio")),
    ("", r"reward_margin$", Spec(1, "β·log-ratio")),
    ("", r"reward_accuracy$", Spec(1, "fraction")),
    # classification and benchmarks
    ("", r"(^|[._/])(accuracy|precision|recall|f1|acc|acc_norm)$", Spec(1, "fraction")),
    ("", r"(^|[._])(tp|tn)$", Spec(1, "messages")),
    ("", r"(^|[._])(fp|fn)$", Spec(-1, "messages")),
    # answers: ROUGE-L and exact match, the judge's scores (a model's mean or a paired difference b - a)
    ("", r"rouge_l(\.(\w+_)?mean)?$", Spec(1, "ROUGE-L F1")),
    ("", r"exact_match$", Spec(1, "fraction")),
    ("", r"win_rate$", Spec(1, "fraction")),
    ("", r"(^|[._])((\w+_)?mean|median)$", Spec(1, "score (0-100)")),
    ("", r"(^|[._])(empty_responses|n_refused|n_error|judge_unscored_pairs|undecided)$", Spec(-1, "items")),
    # the training loop's curves
    ("", r"(^|[._/])lr$", Spec(0, "learning rate")),
    ("", r"grad_norm$", Spec(0, "gradient norm (before clipping)")),
    ("", r"(^|[._/])(\w+)_per_s$", Spec(0, "per second")),
]


def _stage(stage: str) -> str:
    return stage.split("/")[0]  # import/gpt2-124m -> import


def spec(name: str, stage: str = "") -> Spec:
    """The row of ``TABLE`` for metric ``name`` of ``stage``; ``name`` may be ``"stage: key"`` (``llmcore compare``)."""
    if ": " in name and not stage:
        stage, name = name.split(": ", 1)
    stage = _stage(stage)
    for stage_pattern, pattern, found in TABLE:
        if re.search(stage_pattern, stage) and re.search(pattern, name):
            if found.unit == "per second":  # tokens_per_s -> tokens/s
                return Spec(0, re.search(pattern, name).group(2) + "/s")
            return found
    return Spec(0, "")


def interval_keys(key: str) -> tuple[str, str] | None:
    """The keys of ``key``'s 95% interval as the stages write them (``mean`` -> ``ci95_low``/``ci95_high``,
    ``compare.rouge_l.diff_mean`` -> ``compare.rouge_l.diff_ci95_low``/...), None for a key that is no mean."""
    m = re.fullmatch(r"(.*?)mean", key)
    if m is None:
        return None
    return f"{m.group(1)}ci95_low", f"{m.group(1)}ci95_high"
