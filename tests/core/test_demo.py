import math

from ciuic import CiuicConfig
from ciuic.demo import progression_batches, run_demo


def test_progressions_follow_the_rule():
    batch = next(progression_batches(batch_size=4, seq_len=10, vocab_size=64, seed=1))
    steps = (batch[:, 1] - batch[:, 0]) % 64
    assert ((batch[:, 1:] - batch[:, :-1]) % 64 == steps[:, None]).all()
    assert set(steps.tolist()) <= {1, 2, 3}


def test_demo_learns_and_measures_the_run():
    result = run_demo(CiuicConfig(), steps=120, progress=False)
    first, last = result.losses[0], sum(result.losses[-10:]) / 10
    assert first > 0.9 * math.log(64)  # an untrained model is at chance level
    assert last < 0.5  # the rule is learned: far below chance
    reading = result.memory
    assert reading.peak_by_category["parameters"] > 0
    assert reading.peak_by_category["activations"] > 0
    assert "loss:" in result.summary()


def test_demo_summary_carries_the_apply_report():
    config = CiuicConfig(budget="1GiB")
    result = run_demo(config, steps=2, progress=False)
    assert result.apply_report.startswith("ciuic applied to PeftModel: budget=1073741824")
    assert result.apply_report in result.summary()
    assert "deferred budget" in result.summary()
