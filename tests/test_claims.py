"""The findings as claims: each rule on hand-made replicates, the k-of-n tally, and the
between/within-host split of the spread."""

from __future__ import annotations

import numpy as np
import pytest

from modecl.core import claims
from modecl.core.claims import CLAIMS, Claim, claim_columns, claim_rows, tally
from modecl.core.metrics import variance_split
from modecl.core.results import MethodResult, Results, SeedResult, Stage


def stage(generation=None, conflict=None) -> Stage:
    measures = {} if generation is None else {"generation_accuracy": generation}
    return Stage("t", [0.5], [0.5], measures=measures, conflict=conflict)


def method(forgetting=0.5, generation=None, constrained=None, conflict=None) -> MethodResult:
    summary = {"average_forgetting": forgetting, "constrained_average_forgetting": constrained}
    return MethodResult([[0.5]], [[0.5]], summary, [stage(generation, conflict)])


def rep(host_generation=0.96, **methods: MethodResult) -> SeedResult:
    names = {k.replace("_", "-"): v for k, v in methods.items()}
    return SeedResult(0, stage(host_generation), names)


def check(name: str, replicate: SeedResult) -> bool | None:
    return next(c for c in CLAIMS if c.name == name).rule(replicate)


@pytest.mark.parametrize(
    ("name", "replicate", "verdict"),
    [
        ("seq-lora-loses-drawing", rep(0.96, seq_lora=method(generation=0.86)), True),
        ("seq-lora-loses-drawing", rep(0.96, seq_lora=method(generation=0.87)), False),
        ("seq-lora-loses-drawing", rep(0.96, mode=method(generation=0.5)), None),  # not run
        ("seq-lora-loses-drawing", rep(None, seq_lora=method(generation=0.5)), None),  # no host
        ("moe-lora-loses-drawing", rep(0.9, moe_lora=method(generation=0.3)), True),
        # distilling methods (mode, lwf) within 0.03; seq-lora does not count
        (
            "distillers-keep-drawing",
            rep(
                0.96,
                mode=method(generation=0.93),
                lwf=method(generation=0.99),
                seq_lora=method(generation=0.1),
            ),
            True,
        ),
        (
            "distillers-keep-drawing",
            rep(0.96, mode=method(generation=0.929), lwf=method(generation=0.99)),
            False,
        ),
        ("distillers-keep-drawing", rep(0.96, seq_lora=method(generation=0.9)), None),
        (
            "no-kd-draws-worse",
            rep(mode_no_kd=method(generation=0.2), seq_lora=method(generation=0.4)),
            True,
        ),
        (
            "no-kd-draws-worse",
            rep(mode_no_kd=method(generation=0.4), seq_lora=method(generation=0.4)),
            False,
        ),
        (
            "mode-draws-better",
            rep(mode=method(generation=0.9), seq_lora=method(generation=0.4)),
            True,
        ),
        ("cl-moe-forgets-less", rep(cl_moe=method(0.3), seq_lora=method(0.4)), True),
        ("mode-forgets-less-than-cl-moe", rep(mode=method(0.3), cl_moe=method(0.2)), False),
        ("o-lora-forgets-less", rep(o_lora=method(0.39), seq_lora=method(0.4)), True),
        ("a-gem-forgets-less", rep(a_gem=method(0.41), seq_lora=method(0.4)), False),
        ("a-gem-forgets-less", rep(a_gem=method(0.41)), None),  # seq-lora not run
        ("o-lora-forgets-less-than-mode", rep(o_lora=method(0.2), mode=method(0.4)), True),
        ("a-gem-forgets-less-than-mode", rep(a_gem=method(0.5), mode=method(0.4)), False),
        ("cl-moe-loses-drawing", rep(0.96, cl_moe=method(generation=0.93)), False),
        ("o-lora-loses-drawing", rep(0.96, o_lora=method(generation=0.85)), True),
        ("a-gem-loses-drawing", rep(0.96, a_gem=method(generation=0.5)), True),
        ("mode-forgets-less", rep(mode=method(0.3), seq_lora=method(0.4)), True),
        ("mode-forgets-less", rep(mode=method(0.4), seq_lora=method(0.4)), False),
        (
            "mode-forgets-less-constrained",
            rep(mode=method(0.1, constrained=0.35), seq_lora=method(0.4, constrained=0.3)),
            False,
        ),
        (
            "mode-forgets-less-constrained",
            rep(mode=method(constrained=None), seq_lora=method(constrained=0.3)),
            None,
        ),
        (
            "replay-forgets-least",
            rep(replay=method(0.1), ewc=method(0.2), seq_lora=method(0.5)),
            True,
        ),
        ("replay-forgets-least", rep(replay=method(0.3), ewc=method(0.2)), False),
        ("replay-forgets-least", rep(replay=method(0.3)), None),  # nothing to compare with
        (
            "mode-task-forgets-least-of-mode",
            rep(mode_task=method(0.2), mode=method(0.3), seq_lora=method(0.1)),
            True,  # seq-lora is no MoDE variant
        ),
        (
            "text-lora-as-good-as-experts",
            rep(mode_text_lora=method(0.43), mode_split=method(0.40)),
            True,
        ),
        (
            "text-lora-as-good-as-experts",
            rep(mode_text_lora=method(0.44), mode_split=method(0.40)),
            False,
        ),
    ],
)
def test_each_claim_rule_on_hand_made_replicates(name, replicate, verdict):
    assert check(name, replicate) is verdict


def conflict(cosine, correlation, measured=0.1, sgd=-0.01):
    return {
        "steps": 3,
        "mean_cosine": cosine,
        "correlation": correlation,
        "measured_image_loss_change": measured,
        "sgd_image_loss_change": sgd,
    }


def test_the_conflict_claims_read_the_monitor_summary():
    quiet = method(conflict=conflict(0.01, 0.95))
    assert check("conflict-is-not-the-driver", rep(seq_lora=quiet, mode=quiet)) is True
    loud = method(conflict=conflict(-0.06, 0.95))
    assert check("conflict-is-not-the-driver", rep(seq_lora=quiet, mode=loud)) is False
    loose = method(conflict=conflict(0.0, 0.85))
    assert check("conflict-is-not-the-driver", rep(seq_lora=loose)) is False
    assert check("conflict-is-not-the-driver", rep(seq_lora=method())) is None  # unmonitored
    undefined = method(conflict=conflict(0.0, None))  # one monitored step: no correlation
    assert check("conflict-is-not-the-driver", rep(seq_lora=undefined)) is None
    misses = method(conflict=conflict(0.0, 0.9, measured=0.1, sgd=0.049))
    assert check("sgd-formula-misses", rep(seq_lora=misses)) is True
    hits = method(conflict=conflict(0.0, 0.9, measured=0.1, sgd=0.05))
    assert check("sgd-formula-misses", rep(seq_lora=hits)) is False
    fell = method(conflict=conflict(0.0, 0.9, measured=-0.1, sgd=-0.2))
    assert check("sgd-formula-misses", rep(seq_lora=fell)) is False


def results(*reps: SeedResult) -> Results:
    return Results("s", "bench", False, ["t"], {}, [0], {}, {}, {}, list(reps), reps[0], None)


def test_tally_counts_k_of_n_over_the_replicates_of_several_runs():
    holds = rep(mode=method(0.3), seq_lora=method(0.4))
    fails = rep(mode=method(0.5), seq_lora=method(0.4))
    lacks = rep(mode=method(0.3))
    claim = Claim("x", "mode forgets less", claims.forgets_less("mode", "seq-lora"))
    (t,) = tally([results(holds, fails), results(holds, lacks)], [claim])
    assert (t.holds, t.runs, t.verdict) == (2, 3, "mixed")
    rows = claim_rows([t], replicates=4)
    assert rows[2] == "| `x` | mode forgets less | 2 of 3 (of 4) | mixed |"
    (t,) = tally([results(holds, holds)], [claim])
    assert (t.holds, t.runs, t.verdict) == (2, 2, "general")
    (t,) = tally([results(fails)], [claim])
    assert t.verdict == "never"
    (t,) = tally([results(lacks)], [claim])
    assert t.verdict == "not measured" and claim_rows([t], 1) == claim_rows([], 1)


def test_the_per_run_table_has_a_column_per_run():
    holds = rep(mode=method(0.3), seq_lora=method(0.4))
    fails = rep(mode=method(0.5), seq_lora=method(0.4))
    claim = Claim("x", "mode forgets less", claims.forgets_less("mode", "seq-lora"))
    other = Claim("y", "never measured", claims.forgets_less("nope", "seq-lora"))
    runs = {"a": results(holds, fails), "b": results(holds), "c": results(rep())}
    assert claim_columns(runs, [claim, other]) == [
        "| claim | finding | a | b | c |",
        "|---|---|---|---|---|",
        "| `x` | mode forgets less | 1 of 2 | 1 of 1 | – |",
    ]


def test_every_claim_has_a_unique_name():
    names = [c.name for c in CLAIMS]
    assert len(set(names)) == len(names)


def test_the_variance_split_on_hand_made_numbers():
    # hosts' means 2, 4, 6 (grand mean 4); seeds +-1 around each
    split = variance_split([[1, 3], [3, 5], [5, 7]])
    assert split["mean"] == 4
    assert split["between_std"] == pytest.approx(2.0)  # std of 2, 4, 6
    assert split["within_std"] == pytest.approx(np.sqrt(6 / 3))  # SS_within 6 over 6 - 3
    assert split["between_share"] == pytest.approx(16 / 22)  # SS_between 2 * 8 = 16
    assert split["std"] == pytest.approx(np.std([1, 3, 3, 5, 5, 7], ddof=1))
    same_hosts = variance_split([[1, 3], [1, 3]])
    assert same_hosts["between_std"] == 0 and same_hosts["between_share"] == 0
    one_seed = variance_split([[1], [3]])
    assert one_seed["within_std"] == 0 and one_seed["between_share"] == 1
    assert variance_split([[2, 2], [2, 2]])["between_share"] == 0
    with pytest.raises(ValueError, match="at least two groups"):
        variance_split([[1, 2]])
