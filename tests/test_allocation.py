"""Composite scores, global allocation and kept positions on hand-made scores."""

import torch

from kvpress_compose.compression import (
    composite_scores,
    compute_n_kept,
    floor_per_layer,
    head_budgets,
    kept_positions,
    layer_budgets,
    per_head_shares,
    pooled_scores,
    rank_tokens,
    shared_ranking,
    stack_layer_scores,
    top_entries,
    with_sinks_kept,
)

INF = float("inf")


def test_compute_n_kept_floors_without_float_noise():
    assert compute_n_kept(100, 0.9) == 10  # 100 * (1 - 0.9) = 9.999999999999998 in floating point
    assert compute_n_kept(100, 0.7) == 30
    assert compute_n_kept(7, 0.5) == 3
    assert compute_n_kept(64, 0.0) == 64


def test_composite_score_is_the_head_mean_of_each_rank():
    scores = torch.tensor([[[[0.1, 0.9, 0.5], [0.3, 0.2, 0.8]]]])  # (layers=1, batch=1, heads=2, n=3)
    sorted_scores, order = rank_tokens(scores)
    assert order.tolist() == [[[[1, 2, 0], [2, 0, 1]]]]
    torch.testing.assert_close(composite_scores(sorted_scores, "mean"), torch.tensor([[0.85, 0.4, 0.15]]))
    torch.testing.assert_close(composite_scores(sorted_scores, "max"), torch.tensor([[0.9, 0.5, 0.2]]))


def test_global_top_k_gives_more_to_the_layer_with_higher_scores():
    composite = torch.tensor([[0.9, 0.8, 0.7, 0.6], [0.5, 0.4, 0.3, 0.2], [0.95, 0.1, 0.05, 0.01]])
    # top 6 with one forced per layer: 0.95 (L2), 0.9 (L0), 0.5 (L1) forced, then 0.8, 0.7, 0.6 (L0)
    budgets = layer_budgets(composite, n_kept=6, min_per_layer=1)
    assert budgets.tolist() == [4, 1, 1]
    assert layer_budgets(composite, n_kept=6, min_per_layer=2).tolist() == [2, 2, 2]


def test_ties_are_broken_by_layer_then_rank():
    composite = torch.ones(3, 4)
    assert layer_budgets(composite, n_kept=6, min_per_layer=1).tolist() == [4, 1, 1]


def test_padding_is_never_kept_even_if_the_budget_allows():
    scores = torch.tensor([[[0.9, 0.5, -INF], [0.8, -INF, -INF]]])  # (rows=1, groups=2, n=3)
    assert top_entries(scores, n_kept=6, n_forced=1).tolist() == [[2, 1]]


def test_head_budgets_are_global_per_row():
    scores = torch.tensor([[[[0.9, 0.8, 0.7, 0.6], [0.1, 0.05, 0.04, 0.03]]]])  # (L=1, b=1, H=2, n=4)
    sorted_scores, _ = rank_tokens(scores)
    assert head_budgets(sorted_scores, 0.5, min_per_head=1).tolist() == [[[3, 1]]]


def test_kept_positions_are_each_heads_top_in_ascending_order():
    order = torch.tensor([[[4, 0, 3, 1, 2], [2, 1, 0, 4, 3]]])
    assert kept_positions(order, 3).tolist() == [[[0, 3, 4], [0, 1, 2]]]


def test_stack_layer_scores_pads_shorter_layers_with_minus_infinity():
    short, long = torch.ones(1, 2, 3), torch.full((1, 2, 5), 2.0)
    stacked = stack_layer_scores([short, long])
    assert stacked.shape == (2, 1, 2, 5)
    assert torch.equal(stacked[0, ..., :3], short) and torch.isinf(stacked[0, ..., 3:]).all()
    assert torch.equal(stacked[1], long)


def test_per_head_shares_divide_finite_scores_by_their_sum_and_leave_infinities():
    sorted_scores = torch.tensor([[[[INF, 0.6, 0.2, 0.2], [0.5, 0.5, -INF, -INF]]]])  # (L=1, b=1, H=2, n=4)
    torch.testing.assert_close(per_head_shares(sorted_scores),
                               torch.tensor([[[[INF, 0.6, 0.2, 0.2], [0.5, 0.5, -INF, -INF]]]]))
    torch.testing.assert_close(per_head_shares(sorted_scores * 4), per_head_shares(sorted_scores))


def test_normalised_allocation_does_not_favour_a_layer_that_scores_every_token_high():
    # layer 0 scores every token high; layer 1 attends to two tokens. Raw scores give layer 0 all but one.
    high_everywhere = torch.tensor([0.95, 0.95, 0.9, 0.9, 0.9, 0.9])
    peaked = torch.tensor([0.8, 0.7, 0.05, 0.05, 0.05, 0.05])
    sorted_scores = torch.stack([high_everywhere, peaked])[:, None, None]  # (L=2, b=1, H=1, n=6)
    assert layer_budgets(composite_scores(sorted_scores, "mean"), 6, 1).tolist() == [5, 1]
    # shares: layer 0 each ~0.17, layer 1: 0.47, 0.41, then 0.03: the peaked layer keeps its two tokens
    shares = composite_scores(per_head_shares(sorted_scores), "mean")
    assert layer_budgets(shares, 6, 1).tolist() == [4, 2]


def test_floor_per_layer_is_a_fraction_of_the_uniform_budget():
    assert floor_per_layer(n_kept=100, n_layers=4, floor=0.5, min_per_layer=1) == 12  # floor(0.5 * 25)
    assert floor_per_layer(n_kept=100, n_layers=4, floor=0.0, min_per_layer=3) == 3
    assert floor_per_layer(n_kept=100, n_layers=4, floor=1.0, min_per_layer=1) == 25
    composite = torch.tensor([[0.9, 0.8, 0.7, 0.6], [0.1, 0.05, 0.04, 0.03]])
    assert layer_budgets(composite, 4, floor_per_layer(4, 2, 1.0, 1)).tolist() == [2, 2]


def test_sinks_are_the_first_valid_positions_of_each_row_and_never_padding():
    scores = torch.full((2, 2, 1, 5), 0.5)  # (L=2, b=2, H=1, n=5)
    scores[:, 1, :, :2] = -INF  # row 1 is left-padded by 2
    valid = torch.tensor([[True] * 5, [False, False, True, True, True]])
    kept = with_sinks_kept(scores, valid, n_sink=2)
    assert kept[0, 0, 0].tolist() == [INF, INF, 0.5, 0.5, 0.5]
    assert kept[1, 1, 0].tolist() == [-INF, -INF, INF, INF, 0.5]
    assert torch.equal(with_sinks_kept(scores, valid, n_sink=0), scores)


def test_head_budgets_per_layer_give_every_layer_the_same_budget_its_heads_compete_for():
    # (layers=2, batch=1, heads=2, n=4), each head's scores sorted: layer 0's first head dominates, layer 1 is even
    sorted_scores = torch.tensor([[[[9.0, 8, 7, 6], [1, 0.5, 0.2, 0.1]]], [[[3.0, 2, 1, 0], [3, 2, 1, 0]]]])
    assert head_budgets(sorted_scores, 0.5, min_per_head=1).tolist() == [[[4, 1], [2, 1]]]  # one global top-8
    per_layer = head_budgets(sorted_scores, 0.5, min_per_head=1, per_layer=True)
    assert per_layer.tolist() == [[[3, 1], [2, 2]]]  # 4 per layer, split by each layer's own scores


def test_pooling_raises_each_score_to_its_neighbourhoods_best_and_leaves_infinities():
    scores = torch.tensor([[INF, 0.1, 0.2, 0.9, 0.1, 0.1, 0.1, 0.3, -INF]])
    # kernel 3: one neighbour each side; the sink (+inf) and padding (-inf) lend nothing and stay as they are
    assert torch.equal(pooled_scores(scores, 3), torch.tensor([[INF, 0.2, 0.9, 0.9, 0.9, 0.1, 0.3, 0.3, -INF]]))
    assert torch.equal(pooled_scores(scores, 5), torch.tensor([[INF, 0.9, 0.9, 0.9, 0.9, 0.9, 0.3, 0.3, -INF]]))
    assert pooled_scores(scores, 1) is scores
    batched = torch.stack([scores, scores.flip(-1)])[:, None]  # (2, 1, 1, 9): each row pooled on its own
    assert pooled_scores(batched, 3)[1, 0, 0].tolist() == pooled_scores(scores.flip(-1), 3)[0].tolist()


def test_shared_ranking_keeps_in_every_layer_what_any_layer_ranks_high():
    # (L=2, b=1, H=1, n=5): layer 0 singles out token 3 on a large scale, layer 1 token 1 on a tiny one
    scores = torch.tensor([[0.5, 0.4, 0.3, 0.9, 0.2], [0.001, 0.004, 0.002, 0.0, 0.003]])[:, None, None]
    shared = shared_ranking(scores)
    assert torch.equal(shared[0], shared[1])
    # percentiles: layer 0 gives [.75, .5, .25, 1, 0], layer 1 [.25, 1, .5, 0, .75]; each token takes its best
    torch.testing.assert_close(shared[0, 0, 0], torch.tensor([0.75, 1.0, 0.5, 1.0, 0.75]))
    assert rank_tokens(shared)[1][0, 0, 0, :2].tolist() == [1, 3]


def test_shared_ranking_counts_finite_scores_only_and_keeps_infinities():
    # layer 1 lacks the last two positions (-inf); the sink (+inf) stays +inf in both layers
    scores = torch.tensor([[INF, 0.1, 0.3, 0.2, 0.4], [INF, 0.2, 0.1, -INF, -INF]])[:, None, None]
    shared = shared_ranking(scores)
    # finite percentiles: layer 0 over 4 tokens [0, 2/3, 1/3, 1], layer 1 over 2 tokens [1, 0]
    torch.testing.assert_close(shared[0, 0, 0], torch.tensor([INF, 1.0, 2 / 3, 1 / 3, 1.0]))
    torch.testing.assert_close(shared[1, 0, 0], torch.tensor([INF, 1.0, 2 / 3, -INF, -INF]))


def test_shared_ranking_of_half_precision_scores_keeps_every_percentile_apart():
    scores = torch.arange(1, 2001, dtype=torch.int16).view(torch.bfloat16)[None, None, None]  # 2000 distinct
    shared = shared_ranking(scores)  # percentiles k / 1999: bfloat16 would round most of them together
    assert shared.dtype == torch.float32 and shared.unique().numel() == 2000


def test_shared_ranking_gives_equal_scores_one_percentile_and_a_constant_layer_nothing():
    # layer 1 scores every token alike: it must not favour the later tokens (position order gave 0 .. 1)
    scores = torch.tensor([[0.9, 0.3, 0.2, 0.1, 0.05], [0.0] * 5])[:, None, None]
    torch.testing.assert_close(shared_ranking(scores)[0, 0, 0], torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    plateau = torch.tensor([[0.2, 0.9, 0.9, 0.9, 0.3, 0.3, 0.3]])[None, None]  # as pooling leaves them
    torch.testing.assert_close(shared_ranking(plateau)[0, 0, 0], torch.tensor([0.0, 4, 4, 4, 1, 1, 1]) / 6)


def test_shared_ranking_ranks_each_batch_row_on_its_own():
    scores = torch.rand(3, 2, 2, 11, generator=torch.Generator().manual_seed(0))  # (L, b, H, n)
    scores[:, 1, :, :4] = -INF  # row 1 left-padded
    shared = shared_ranking(scores)
    for row in range(2):
        torch.testing.assert_close(shared[:, row], shared_ranking(scores[:, row:row + 1])[:, 0])
    assert torch.equal(shared[:, 1, :, :4], scores[:, 1, :, :4])
