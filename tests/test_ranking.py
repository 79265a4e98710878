"""dpokit.ranking on lists small enough to compute by hand, and the recommender family's top-k lists."""

import math

import pytest
import torch

from dpokit.errors import DpokitError
from dpokit.ranking import (coverage, exposure_gini, hit_rate_at_k, intra_list_diversity, ndcg_at_k,
                            popularity_bias)

LISTS = [["a", "b", "c"], ["b", "a", "d"], ["c", "d", "a"]]


def test_hit_rate_and_ndcg_by_hand():
    targets = ["a", "d", "x"]  # ranks 0, 2 and absent
    assert hit_rate_at_k(LISTS, targets, k=3) == pytest.approx(2 / 3)
    assert hit_rate_at_k(LISTS, targets, k=2) == pytest.approx(1 / 3)
    assert ndcg_at_k(LISTS, targets, k=3) == pytest.approx((1 / math.log2(2) + 1 / math.log2(4)) / 3)
    assert ndcg_at_k(LISTS, targets, k=2) == pytest.approx(1 / 3)
    with pytest.raises(DpokitError, match="3 recommendation lists but 2 target"):
        ndcg_at_k(LISTS, ["a", "b"])


def test_coverage_and_gini_of_exposure():
    catalogue = ["a", "b", "c", "d", "e"]
    assert coverage(LISTS, len(catalogue)) == pytest.approx(4 / 5)
    assert coverage(LISTS, len(catalogue), k=1) == pytest.approx(3 / 5)  # a, b, c
    # exposures a3 b2 c2 d2 e0, sorted 0 2 2 2 3:
    # Σ(2i − n − 1)x = −4·0 − 2·2 + 0·2 + 2·2 + 4·3 = 12, over n·Σx = 5·9
    assert exposure_gini(LISTS, catalogue) == pytest.approx(12 / 45)
    assert exposure_gini([["a"], ["b"], ["c"], ["d"], ["e"]], catalogue) == pytest.approx(0.0)
    collapsed = exposure_gini([["a"]] * 5, catalogue)
    assert collapsed == pytest.approx(4 / 5) and collapsed > exposure_gini(LISTS, catalogue)
    with pytest.raises(DpokitError, match="'z' is not in the catalogue"):
        exposure_gini([["z"]], catalogue)


def test_intra_list_diversity_and_popularity_bias():
    genre = {"a": 0, "b": 0, "c": 1, "d": 1}
    same = lambda x, y: float(genre[x] != genre[y])  # noqa: E731
    # list 1: (a,b) 0, (a,c) 1, (b,c) 1 → 2/3; list 2: (b,a) 0, (b,d) 1, (a,d) 1 → 2/3; list 3: (c,d) 0, (c,a) 1,
    # (d,a) 1 → 2/3
    assert intra_list_diversity(LISTS, same) == pytest.approx(2 / 3)
    assert intra_list_diversity([["a", "b"], ["c", "a"]], same) == pytest.approx(0.5)
    pop = {"a": 10, "b": 4, "c": 1}
    assert popularity_bias(LISTS, pop) == pytest.approx(((10 + 4 + 1) / 3 + (4 + 10 + 0) / 3 + (1 + 0 + 10) / 3) / 3)


def test_recommender_lists_rank_by_logit_and_leave_out_the_history():
    from dpokit.families import get_family

    family = get_family("recommender")
    items = [f"i{k}" for k in range(8)]
    torch.manual_seed(0)
    model = family.new_model(items, max_history=5, hidden=8, blocks=1, heads=1, dropout=0.0).eval()
    from dpokit.families.recommender import Items  # the test may read internals; shared code may not

    vocab = Items(items, "test")
    histories = [["i1", "i2"], ["i3"]]
    lists = family.sample(model, vocab, histories, num_generations=3)
    assert [len(r) for r in lists] == [3, 3]
    assert not set(lists[0]) & {"i1", "i2"} and "i3" not in lists[1]
    with torch.no_grad():  # the first list is the top 3 of the logits with the padding and history masked
        logits = model(torch.tensor([[2, 3]]))[0]
        logits[[0, 2, 3]] = -math.inf
        want = [items[i - 1] for i in logits.topk(3).indices.tolist()]
    assert lists[0] == want
    kept = family.sample(model, vocab, histories, num_generations=8, exclude_history=False)
    assert sorted(kept[0]) == sorted(items)  # the whole catalogue, history included
    assert family.sample(model, vocab, histories, num_generations=3) == lists  # deterministic
    with pytest.raises(DpokitError, match="context 2: unknown item 'zz'"):
        family.sample(model, vocab, [["i1"], ["zz"]])
    with pytest.raises(DpokitError, match="not max_new_tokens"):
        family.sample(model, vocab, histories, max_new_tokens=5)
