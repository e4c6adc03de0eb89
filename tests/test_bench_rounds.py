"""benchmarks/run.py --rounds: each target judged on its median over the rounds (the issue's
protocol), "every stream complete" in every round; the rounds' values and count met kept."""

import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_run():
    """benchmarks/run.py as a module; the benchmarks directory it puts on sys.path is taken off again."""
    path = list(sys.path)
    spec = importlib.util.spec_from_file_location("bench_run", os.path.join(ROOT, "benchmarks", "run.py"))
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = path
    return module


def target(name, value, limit, ok, higher=False):
    return {"name": name, "label": name, "value": value, "target": limit, "pass": ok, "note": "",
            "higher_is_better": higher}


def test_targets_are_judged_on_their_medians():
    """Met in 2 of 3 rounds passes on its median; higher-is-better (req/s) judged the other way
    (met in 1 of 3, median below: a miss); one incomplete round fails "every stream complete"."""
    run = load_run()
    rounds = [
        [target("ttfb", 120.0, 100.0, False), target("rps", 3100, 3000, True, higher=True),
         target("complete", "10/10", "all", True)],
        [target("ttfb", 90.0, 100.0, True), target("rps", 2900, 3000, False, higher=True),
         target("complete", "9/10", "all", False)],
        [target("ttfb", 95.0, 100.0, True), target("rps", 2950, 3000, False, higher=True),
         target("complete", "10/10", "all", True)],
    ]
    ttfb, rps, complete = run.over_rounds(rounds)
    assert (ttfb["value"], ttfb["pass"], ttfb["rounds_met"], ttfb["values"]) == (95.0, True, 2, [120.0, 90.0, 95.0])
    assert (rps["value"], rps["pass"], rps["rounds_met"]) == (2950, False, 1)  # higher is better: 2,950 < 3,000
    assert complete["pass"] is False and complete["value"] == "10/10, 9/10, 10/10"  # one round short is a miss
    assert ttfb["rounds"] == rps["rounds"] == complete["rounds"] == 3


def test_a_target_without_a_value_is_not_judged():
    """A target no round could measure is neither a pass nor a miss (n/a), and met in no round."""
    run = load_run()
    (only,) = run.over_rounds([[target("p99", None, 50.0, None)], [target("p99", None, 50.0, None)]])
    assert only["value"] is None and only["pass"] is None and only["rounds_met"] == 0
