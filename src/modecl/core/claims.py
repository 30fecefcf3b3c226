"""The study's findings as named claims, each a rule checked on every replicate of a run.

A trained host is a sample, and so is a run seed: a finding measured once can reverse on
another host or machine. So every finding the docs state is a :class:`Claim` with a
rule over one replicate's results (a seed on a host, :class:`~modecl.core.results.SeedResult`)
that says whether it holds there, or ``None`` where the replicate lacks what the rule needs
(a method that did not run, a measure the world does not take). :func:`tally` counts, over
every replicate of one or more runs, in how many it holds: a finding is general only where
it holds in every one (`modecl claims RUN...`, and the report's "Claims" section).

The measures read: each method's ``summary`` (``average_forgetting``, its constrained twin),
the world measure ``generation_accuracy`` after the last task against the pre-trained
host's, and the gradient-conflict monitor's per-stage summary (``conflict``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from modecl.core.methods import get_method
from modecl.core.results import Results, SeedResult

Rule = Callable[[SeedResult], bool | None]

MODE_VARIANTS = ("mode", "mode-task", "mode-sample", "mode-no-kd", "mode-text-lora", "mode-split")


@dataclass(frozen=True)
class Claim:
    """A finding: its short ``name``, its ``text`` as stated, and its ``rule``."""

    name: str
    text: str
    rule: Rule


def _generation(rep: SeedResult, method: str) -> float | None:
    entry = rep.methods.get(method)
    return None if entry is None else entry.stages[-1].measures.get("generation_accuracy")


def _host_generation(rep: SeedResult) -> float | None:
    return rep.pretrained.measures.get("generation_accuracy")


def _forgetting(rep: SeedResult, method: str, constrained: bool = False) -> float | None:
    entry = rep.methods.get(method)
    key = "constrained_average_forgetting" if constrained else "average_forgetting"
    return None if entry is None else entry.summary.get(key)


def _defined(*values: float | None) -> bool:
    return all(v is not None for v in values)


def drops_below_host(method: str, by: float) -> Rule:
    """``method``'s generation accuracy after the last task is at least ``by`` below the
    pre-trained host's."""

    def rule(rep: SeedResult) -> bool | None:
        drawn, host = _generation(rep, method), _host_generation(rep)
        return drawn <= host - by if _defined(drawn, host) else None

    return rule


def distillers_keep_drawing(within: float) -> Rule:
    """Every distilling method of the run ends with generation within ``within`` of the
    host's (at least one must have run)."""

    def rule(rep: SeedResult) -> bool | None:
        host = _host_generation(rep)
        drawn = [_generation(rep, m) for m in rep.methods if get_method(m).needs_pairs]
        drawn = [d for d in drawn if d is not None]
        if host is None or not drawn:
            return None
        return all(d >= host - within for d in drawn)

    return rule


def draws_worse(method: str, than: str) -> Rule:
    """``method`` ends with lower generation accuracy than ``than``."""

    def rule(rep: SeedResult) -> bool | None:
        a, b = _generation(rep, method), _generation(rep, than)
        return a < b if _defined(a, b) else None

    return rule


def forgets_less(method: str, than: str, constrained: bool = False, slack: float = 0.0) -> Rule:
    """``method``'s average forgetting is below ``than``'s (plus ``slack``: "at most
    ``slack`` more")."""

    def rule(rep: SeedResult) -> bool | None:
        a = _forgetting(rep, method, constrained)
        b = _forgetting(rep, than, constrained)
        if not _defined(a, b):
            return None
        return a <= b + slack if slack else a < b

    return rule


def forgets_least(method: str, among: Sequence[str] | None = None) -> Rule:
    """``method`` forgets least (exact) of ``among`` (default: every method of the run)
    that ran; at least one other must have."""

    def rule(rep: SeedResult) -> bool | None:
        names = [m for m in (among or rep.methods) if m in rep.methods]
        own = _forgetting(rep, method)
        others = [_forgetting(rep, m) for m in names if m != method]
        if own is None or not others or None in others:
            return None
        return all(own < f for f in others)

    return rule


def _conflict_stages(rep: SeedResult, method: str) -> list[dict]:
    entry = rep.methods.get(method)
    stages = [] if entry is None else [s.conflict for s in entry.stages]
    return [c for c in stages if c and c.get("steps")]


def conflict_is_not_the_driver(cosine_below: float, correlation_above: float) -> Rule:
    """For every monitored method: the mean cosine between the image-loss and text-loss
    gradients stays below ``cosine_below`` in magnitude, while the first-order prediction
    with the optimizer's real update correlates above ``correlation_above`` with the
    measured change (mean over tasks)."""

    def rule(rep: SeedResult) -> bool | None:
        verdicts = []
        for method in rep.methods:
            stages = _conflict_stages(rep, method)
            correlations = [s["correlation"] for s in stages if s["correlation"] is not None]
            if not stages or not correlations:
                continue
            cosine = sum(s["mean_cosine"] for s in stages) / len(stages)
            correlation = sum(correlations) / len(correlations)
            verdicts.append(abs(cosine) < cosine_below and correlation > correlation_above)
        return all(verdicts) if verdicts else None

    return rule


def sgd_formula_misses(method: str, share: float) -> Rule:
    """The paper's first-order SGD formula (-lr <grad L_image, grad L_text>), summed over
    ``method``'s monitored steps, predicts less than ``share`` of the measured rise of the
    image loss (which must have risen)."""

    def rule(rep: SeedResult) -> bool | None:
        stages = _conflict_stages(rep, method)
        if not stages:
            return None
        measured = sum(s["measured_image_loss_change"] for s in stages)
        formula = sum(s["sgd_image_loss_change"] for s in stages)
        return measured > 0 and formula < share * measured

    return rule


def sgd_formula_tracks(method: str, above: float) -> Rule:
    """The paper's SGD formula, step by step, correlates above ``above`` with the measured
    change of the image loss over ``method``'s monitored steps (mean over tasks)."""

    def rule(rep: SeedResult) -> bool | None:
        values = [s.get("sgd_correlation") for s in _conflict_stages(rep, method)]
        values = [v for v in values if v is not None]
        return sum(values) / len(values) > above if values else None

    return rule


CLAIMS = (
    Claim(
        "seq-lora-loses-drawing",
        "seq-lora's generation accuracy falls at least 0.10 below the host's",
        drops_below_host("seq-lora", 0.10),
    ),
    Claim(
        "moe-lora-loses-drawing",
        "moe-lora's generation accuracy falls at least 0.10 below the host's",
        drops_below_host("moe-lora", 0.10),
    ),
    Claim(
        "distillers-keep-drawing",
        "every distilling method keeps generation within 0.03 of the host's",
        distillers_keep_drawing(0.03),
    ),
    Claim(
        "mode-draws-better",
        "mode draws better than seq-lora",
        draws_worse("seq-lora", "mode"),
    ),
    Claim(
        "no-kd-draws-worse",
        "mode-no-kd draws worse than seq-lora",
        draws_worse("mode-no-kd", "seq-lora"),
    ),
    Claim(
        "mode-forgets-less",
        "mode forgets less than seq-lora (exact)",
        forgets_less("mode", "seq-lora"),
    ),
    Claim(
        "mode-forgets-less-constrained",
        "mode forgets less than seq-lora (constrained)",
        forgets_less("mode", "seq-lora", constrained=True),
    ),
    Claim("replay-forgets-least", "replay forgets least of all methods", forgets_least("replay")),
    Claim("ewc-forgets-less", "ewc forgets less than seq-lora", forgets_less("ewc", "seq-lora")),
    Claim(
        "mode-task-forgets-least-of-mode",
        "mode-task forgets least of the MoDE variants",
        forgets_least("mode-task", MODE_VARIANTS),
    ),
    Claim(
        "mode-split-forgets-less",
        "mode-split forgets less than seq-lora",
        forgets_less("mode-split", "seq-lora"),
    ),
    Claim(
        "moe-lora-split-forgets-less",
        "moe-lora-split forgets less than seq-lora",
        forgets_less("moe-lora-split", "seq-lora"),
    ),
    Claim(
        "split-beats-full-mode",
        "mode-split forgets less than mode",
        forgets_less("mode-split", "mode"),
    ),
    Claim(
        "split-beats-full-moe-lora",
        "moe-lora-split forgets less than moe-lora",
        forgets_less("moe-lora-split", "moe-lora"),
    ),
    Claim(
        "text-lora-as-good-as-experts",
        "mode-text-lora forgets at most 0.03 more than mode-split",
        forgets_less("mode-text-lora", "mode-split", slack=0.03),
    ),
    Claim(
        "cl-moe-forgets-less",
        "cl-moe forgets less than seq-lora (the CL-MoE paper's and the MoDE paper's table)",
        forgets_less("cl-moe", "seq-lora"),
    ),
    Claim(
        "mode-forgets-less-than-cl-moe",
        "mode forgets less than cl-moe (the MoDE paper's table)",
        forgets_less("mode", "cl-moe"),
    ),
    Claim(
        "o-lora-forgets-less",
        "o-lora forgets less than seq-lora",
        forgets_less("o-lora", "seq-lora"),
    ),
    Claim(
        "a-gem-forgets-less",
        "a-gem forgets less than seq-lora",
        forgets_less("a-gem", "seq-lora"),
    ),
    Claim(
        "o-lora-forgets-less-than-mode",
        "o-lora forgets less than mode",
        forgets_less("o-lora", "mode"),
    ),
    Claim(
        "a-gem-forgets-less-than-mode",
        "a-gem forgets less than mode",
        forgets_less("a-gem", "mode"),
    ),
    *(
        Claim(
            f"{name}-loses-drawing",
            f"{name}'s generation accuracy falls at least 0.10 below the host's",
            drops_below_host(name, 0.10),
        )
        for name in ("cl-moe", "o-lora", "a-gem")
    ),
    Claim(
        "conflict-is-not-the-driver",
        "the gradient cosine stays below 0.05 while the real-update prediction correlates "
        "above 0.9 with the measured change",
        conflict_is_not_the_driver(0.05, 0.9),
    ),
    Claim(
        "sgd-formula-misses",
        "the SGD formula predicts less than half of seq-lora's measured image-loss rise",
        sgd_formula_misses("seq-lora", 0.5),
    ),
    Claim(
        "sgd-formula-tracks-seq-lora",
        "the SGD formula correlates above 0.9 with seq-lora's measured image-loss change",
        sgd_formula_tracks("seq-lora", 0.9),
    ),
)


@dataclass
class Tally:
    """A claim over replicates: in how many it ``holds`` of the ``runs`` it applies to."""

    claim: Claim
    holds: int
    runs: int

    @property
    def verdict(self) -> str:
        if not self.runs:
            return "not measured"
        if self.holds == self.runs:
            return "general" if self.runs > 1 else "holds"
        return "never" if self.holds == 0 else "mixed"


def replicates(runs: Sequence[Results]) -> list[SeedResult]:
    """Every replicate (a seed on a host) of ``runs``."""
    return [rep for results in runs for rep in results.per_seed]


def tally(runs: Sequence[Results], claims: Sequence[Claim] = CLAIMS) -> list[Tally]:
    """Each claim: in how many of the replicates of ``runs`` that it applies to it holds."""
    reps = replicates(runs)
    out = []
    for claim in claims:
        verdicts = [v for v in (claim.rule(rep) for rep in reps) if v is not None]
        out.append(Tally(claim, sum(verdicts), len(verdicts)))
    return out


def claim_rows(tallies: Sequence[Tally], replicates: int) -> list[str]:
    """The claims table (Markdown): each claim, "k of n" replicates, and the verdict;
    claims that apply to none of the ``replicates`` are left out."""
    rows = ["| claim | finding | holds in | verdict |", "|---|---|---|---|"]
    for t in tallies:
        if t.runs:
            note = "" if t.runs == replicates else f" (of {replicates})"
            cell = f"{t.holds} of {t.runs}{note}"
            rows.append(f"| `{t.claim.name}` | {t.claim.text} | {cell} | {t.verdict} |")
    return rows


def claim_columns(runs: dict[str, Results], claims: Sequence[Claim] = CLAIMS) -> list[str]:
    """The claims table with one column per run ("k of n" of its replicates): which
    findings survive a change of schedule, host or machine. Claims that apply to none of
    the runs are left out."""
    columns = {label: tally([results], claims) for label, results in runs.items()}
    rows = ["| claim | finding | " + " | ".join(columns) + " |"]
    rows.append("|---|---|" + "---|" * len(columns))
    for i, claim in enumerate(claims):
        cells = [f"{t[i].holds} of {t[i].runs}" if t[i].runs else "–" for t in columns.values()]
        if any(t[i].runs for t in columns.values()):
            rows.append(f"| `{claim.name}` | {claim.text} | " + " | ".join(cells) + " |")
    return rows
