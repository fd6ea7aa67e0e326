"""Every balancing policy, as a user of the cluster would judge it."""

import collections

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distributor.balancer import Balancer, Policy


def picks(balancer, count, release=True):
    chosen = []
    for _ in range(count):
        index = balancer.acquire()
        chosen.append(index)
        if release and index is not None:
            balancer.release(index)
    return chosen


def test_round_robin_cycles_through_nodes_in_order():
    assert picks(Balancer(Policy.ROUND_ROBIN, [1, 1, 1]), 7) == [0, 1, 2, 0, 1, 2, 0]


def test_round_robin_ignores_weights_and_skips_unavailable_nodes():
    balancer = Balancer(Policy.ROUND_ROBIN, [5, 1, 1])
    balancer.set_available(1, False)
    assert picks(balancer, 4) == [0, 2, 0, 2]
    balancer.set_available(1, True)
    assert sorted(picks(balancer, 3)) == [0, 1, 2]


def test_weighted_round_robin_shares_by_weight_and_interleaves():
    balancer = Balancer(Policy.WEIGHTED_ROUND_ROBIN, [3, 1, 1])
    chosen = picks(balancer, 50)
    assert collections.Counter(chosen) == {0: 30, 1: 10, 2: 10}
    # Smooth: the heavy node never gets more than its share in a row.
    longest = max(len(run) for run in "".join(map(str, chosen)).replace("1", " ").replace("2", " ").split())
    assert longest <= 3


def test_weighted_round_robin_does_not_flood_a_returning_node():
    balancer = Balancer(Policy.WEIGHTED_ROUND_ROBIN, [1, 1])
    balancer.set_available(1, False)
    picks(balancer, 100)
    balancer.set_available(1, True)
    assert collections.Counter(picks(balancer, 10)) == {0: 5, 1: 5}


def test_least_outstanding_picks_the_node_with_fewest_open_connections():
    balancer = Balancer(Policy.LEAST_OUTSTANDING, [1, 1, 1])
    for _ in range(10):
        assert balancer.acquire() is not None  # 4, 3, 3 open
    held = [balancer.outstanding(i) for i in range(3)]
    assert sorted(held) == [3, 3, 4]
    busy = held.index(4)
    for _ in range(4):
        balancer.release(busy)  # the busy node's connections all end
    assert balancer.acquire() == busy


def test_least_outstanding_spreads_short_connections_evenly():
    # Every connection ends before the next starts: all nodes sit at zero, and
    # the tie must rotate rather than always favour the first node.
    assert collections.Counter(picks(Balancer(Policy.LEAST_OUTSTANDING, [1, 1, 1]), 30)) == {0: 10, 1: 10, 2: 10}


def test_weighted_least_outstanding_holds_open_connections_in_proportion_to_weight():
    balancer = Balancer(Policy.WEIGHTED_LEAST_OUTSTANDING, [2, 1])
    picks(balancer, 30, release=False)
    assert (balancer.outstanding(0), balancer.outstanding(1)) == (20, 10)


def test_weight_zero_quiesces_and_weight_changes_take_effect():
    balancer = Balancer(Policy.WEIGHTED_ROUND_ROBIN, [1, 1])
    balancer.set_weight(0, 0)
    assert set(picks(balancer, 5)) == {1}
    balancer.set_weight(0, 3)
    assert collections.Counter(picks(balancer, 40)) == {0: 30, 1: 10}


def test_no_candidate_returns_none():
    balancer = Balancer(Policy.LEAST_OUTSTANDING, [1, 1])
    balancer.set_available(0, False)
    balancer.set_available(1, False)
    assert balancer.acquire() is None


def test_slow_start_ramp_reduces_the_share_of_new_connections():
    balancer = Balancer(Policy.LEAST_OUTSTANDING, [1, 1])
    balancer.set_ramp(1, 0.25)
    picks(balancer, 50, release=False)
    assert balancer.outstanding(1) < balancer.outstanding(0) / 2


@pytest.mark.parametrize("bad", [-1, 10_001, 1.5, True, "2"])
def test_bad_weights_are_refused_with_the_value(bad):
    with pytest.raises(ValueError, match=repr(bad).replace("(", r"\(").replace(".", r"\.")):
        Balancer(Policy.ROUND_ROBIN, [1, bad])


def test_release_without_open_connection_is_an_error():
    with pytest.raises(ValueError):
        Balancer(Policy.ROUND_ROBIN, [1]).release(0)


def test_unknown_policy_names_the_valid_ones():
    with pytest.raises(ValueError, match="least-outstanding"):
        Policy.parse("leastconn")


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from([p for p in Policy if p is not Policy.MAGLEV]),  # a hash, not a pick order: test_maglev.py
    st.lists(st.integers(0, 5), min_size=1, max_size=9),
    st.lists(st.tuples(st.sampled_from("arxw"), st.integers(0, 8), st.booleans()), max_size=60),
)
def test_picks_are_always_the_best_eligible_node(policy, weights, ops):
    balancer = Balancer(policy, weights)
    opened = collections.Counter()
    for op, index, flag in ops:
        index %= len(weights)
        if op == "a":
            eligible = [i for i in range(len(weights)) if balancer.is_available(i) and balancer.weight(i) > 0]
            before = [balancer.outstanding(i) for i in range(len(weights))]
            chosen = balancer.acquire()
            if chosen is None:
                assert not eligible
                continue
            assert chosen in eligible
            if policy is Policy.LEAST_OUTSTANDING:
                assert before[chosen] == min(before[i] for i in eligible)
            if policy is Policy.WEIGHTED_LEAST_OUTSTANDING:
                load = [(before[i] + 1) / balancer.weight(i) for i in range(len(weights)) if i in eligible]
                assert (before[chosen] + 1) / balancer.weight(chosen) == min(load)
            opened[chosen] += 1
        elif op == "r" and opened[index]:
            balancer.release(index)
            opened[index] -= 1
        elif op == "x":
            balancer.set_available(index, flag)
        elif op == "w":
            balancer.set_weight(index, (index + flag) % 4)
    assert all(balancer.outstanding(i) == opened[i] for i in range(len(weights)))


def test_feedback_scales_each_weight_by_the_nodes_own_factor_never_to_nothing():
    balancer = Balancer(Policy.FEEDBACK, [1, 1, 1])
    balancer.set_feedback(1, 0.25)  # a slow node
    picks = [balancer.acquire() for _ in range(600)]
    shares = [picks.count(i) for i in range(3)]
    assert shares[1] > 0 and abs(shares[0] - shares[2]) <= 1
    assert 0.2 < shares[1] / shares[0] < 0.3  # about its factor of the others' share
    with pytest.raises(ValueError):
        balancer.set_feedback(0, 0.0)


def test_feedback_factor_is_one_for_the_fastest_and_falls_smoothly():
    from distributor.heartbeat import FEEDBACK_MIN, feedback_factor

    assert feedback_factor(2.0, 2.0, 0.1) == 1.0
    factors = [feedback_factor(rt, 2.0, 0.1) for rt in (2, 4, 8, 16, 32, 64, 128, 10_000)]
    assert factors == sorted(factors, reverse=True) and factors[-1] == FEEDBACK_MIN
    assert abs(feedback_factor(9.0, 2.0, 0.1) - 0.5) < 0.01  # response time + 5 ms doubled: half the weight
    assert feedback_factor(2.0, 2.0, 1.0) == 0.1 and feedback_factor(2.0, 2.0, 0.5) == 1.0
