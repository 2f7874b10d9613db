"""Metrics against hand-computed values; deterministic class orders and task splits."""
import pytest

from cgil import metrics
from runtime.errors import CgilError
from cgil.scenario import Scenario, class_order, task_sizes

# Three tasks; after task t only tasks 0..t are evaluated (class-IL).
ACC = [
    [90.0, None, None],
    [70.0, 80.0, None],
    [60.0, 50.0, 100.0],
]
SIZES = [10, 30, 60]
TRANSFER = [
    [None, 20.0, 40.0],
    [None, None, 10.0],
    [None, None, None],
]


def test_final_accuracy_both_conventions():
    assert metrics.final_avg_acc(ACC) == pytest.approx((60 + 50 + 100) / 3)
    # pooled: (0.6*10 + 0.5*30 + 1.0*60) / 100 samples
    assert metrics.final_pooled_acc(ACC, SIZES) == pytest.approx(81.0)


def test_average_incremental_accuracy():
    steps = [90.0, 75.0, 70.0]
    assert metrics.step_accuracies(ACC) == pytest.approx(steps)
    assert metrics.avg_incremental_acc(ACC) == pytest.approx(sum(steps) / 3)


def test_forgetting_uses_best_accuracy_before_the_last_task():
    # task 0: max(90, 70) - 60 = 30; task 1: 80 - 50 = 30
    assert metrics.forgetting(ACC) == pytest.approx(30.0)
    assert metrics.forgetting([[50.0]]) is None


def test_transfer_is_mean_over_steps_of_future_task_means():
    # after task 0: mean(20, 40) = 30; after task 1: 10 -> mean 20
    assert metrics.transfer(TRANSFER) == pytest.approx(20.0)
    assert metrics.transfer([[None]]) is None


def test_summarize_reports_every_metric():
    out = metrics.summarize(ACC, SIZES, TRANSFER, TRANSFER)
    assert set(out) == {"final_avg_acc", "final_pooled_acc", "avg_incremental_acc", "forgetting", "transfer",
                        "transfer_unnormalised"}


def test_class_order_is_a_seeded_permutation():
    a, b = class_order(200, 1993), class_order(200, 1993)
    assert a == b and sorted(a) == list(range(200))
    assert class_order(200, 1996) != a
    assert class_order(5, None) == [0, 1, 2, 3, 4]


def test_uneven_split_cars196_like():
    sc = Scenario.build(196, [20] * 9 + [16], seed=1992)
    assert sc.num_tasks == 10 and sc.offsets[-1] == 196
    assert [len(sc.task_classes(t)) for t in range(10)] == [20] * 9 + [16]
    flat = [c for t in sc.tasks() for c in t]
    assert sorted(flat) == list(range(196))  # disjoint and complete
    assert sc.seen_classes(1) == flat[:40]


def test_even_split_puts_remainder_first():
    assert task_sizes(10, 3) == [4, 3, 3]
    with pytest.raises(CgilError, match="between 1 and 10"):
        task_sizes(10, 11)
    with pytest.raises(CgilError, match="do not partition"):
        Scenario.build(10, [5, 4], seed=0)
