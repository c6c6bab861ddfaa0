"""The quickstart's sentences come from its runs: a difference is called clear only when Welch's t-test says so."""

import statistics
from types import SimpleNamespace

from kdcache.experiments.quickstart import comparisons


def _row(method: str, values: list[float]) -> SimpleNamespace:
    runs = [SimpleNamespace(last_top1=v) for v in values]
    return SimpleNamespace(
        method=method, n=len(values), runs=runs, last_top1=(statistics.mean(values), statistics.stdev(values))
    )


def test_a_difference_smaller_than_the_spread_is_within_noise():
    ce = [84.12, 87.74, 90.25]  # 87.37 ± 3.08, the README's CE row
    report = SimpleNamespace(
        rows=[_row("ce", ce), _row("dkd+ls", [89.14, 89.69, 89.97]), _row("kd", [97.0, 97.5, 98.0])]
    )
    lines = comparisons(report, test_images=359)
    assert "one test image is 0.28 points of the 359-image test split" in lines[0]
    dkd = next(x for x in lines if x.startswith("- DKD + Z-score"))
    assert "+2.23 points" in dkd and "within noise" in dkd and "p = 0.3" in dkd
    kd = next(x for x in lines if x.startswith("- KD (cache)"))
    assert "above it" in kd


def test_no_sentence_without_seeds_to_compare():
    only_ce = comparisons(SimpleNamespace(rows=[_row("ce", [80.0, 81.0])]), test_images=100)
    assert len(only_ce) == 1 and only_ce[0].startswith("Against CE only")
    one = SimpleNamespace(method="ce", n=1, runs=[SimpleNamespace(last_top1=80.0)], last_top1=(80.0, None))
    assert comparisons(SimpleNamespace(rows=[one]), test_images=100) == []
