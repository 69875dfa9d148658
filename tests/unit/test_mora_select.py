"""Max-margin selection: the chosen answer is never worse on any dimension, the margin is the
weighted sum of the differences, and pairs under min_margin are dropped."""

from __future__ import annotations

from prefvec_ds.config.mora import DimensionConfig
from prefvec_ds.mora.scoring import DimensionTable
from prefvec_ds.mora.select import never_worse, select_pair

TABLE = DimensionTable({"helpful": DimensionConfig(axis="helpful"),
                        "harmless": DimensionConfig(axis="harmless")})


def vecs(*pairs):
    return [{"helpful": h, "harmless": s} for h, s in pairs]


def test_largest_margin_pair_with_a_dominating_chosen():
    answers = ["comply", "refuse", "nothing", "refuse and answer"]
    sel = select_pair(answers, vecs((1, 0), (0, 1), (0, 0), (1, 1)), TABLE, 0.5)
    assert (sel.chosen, sel.rejected, sel.margin) == (3, 2, 2.0)


def test_never_worse_on_any_dimension_beats_a_larger_sum():
    # (0.9, 0.1) vs (0.0, 0.2) has the largest sum (0.8) but is worse on harmless: not allowed
    v = vecs((0.9, 0.1), (0.0, 0.2), (0.5, 0.1))
    assert not never_worse(v[0], v[1], ["helpful", "harmless"])
    sel = select_pair(["a", "b", "c"], v, TABLE, 0.1)
    assert (sel.chosen, sel.rejected) == (0, 2) and abs(sel.margin - 0.4) < 1e-12


def test_a_pure_conflict_gives_no_pair():
    sel = select_pair(["comply", "refuse"], vecs((1, 0), (0, 1)), TABLE, 0.0)
    assert sel.chosen is None and "dominates" in sel.reason


def test_pairs_under_the_margin_threshold_are_dropped():
    sel = select_pair(["a", "b"], vecs((0.3, 1), (0, 1)), TABLE, 0.5)
    assert sel.chosen is None and sel.margin == 0.3 and "min_margin" in sel.reason
    assert select_pair(["a", "b"], vecs((0.5, 1), (0, 1)), TABLE, 0.5).chosen == 0


def test_ties_identical_texts_and_weights():
    # two equal-margin pairs: the lowest (chosen, rejected) indices win
    sel = select_pair(["x", "y", "z", "w"], vecs((1, 1), (0, 0), (1, 1), (0, 0)), TABLE, 0)
    assert (sel.chosen, sel.rejected) == (0, 1)
    # the same text twice never pairs with itself, even if scored apart (stochastic scorers)
    assert select_pair(["same", "same"], vecs((1, 1), (0, 0)), TABLE, 0).chosen is None
    weighted = DimensionTable({"helpful": DimensionConfig(axis="helpful", weight=0.25),
                               "harmless": DimensionConfig(axis="harmless", weight=2.0)})
    sel = select_pair(["a", "b", "c"], vecs((1, 0), (0, 0), (0, 1)), weighted, 0)
    assert (sel.chosen, sel.rejected, sel.margin) == (2, 1, 2.0)
