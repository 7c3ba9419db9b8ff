"""OOM recovery on CPU: the meter's budget (or an injected ``torch.OutOfMemoryError``) makes a step
run out of memory; ``Recovery`` retries the same batch under the next rung of the ladder.

The step is LoRA on the tiny DeepSeek-V3, 4 rows x 32 tokens. Measured with ``MemoryMeter``
(model and optimizer tracked): with nothing applied the live bytes reach 1,731,272 B by the end
of the forward pass; with ``checkpointing='full'`` the step peaks at 1,408,968 B, with 2
micro-batches at 1,263,304 B (optimizer states add about 2 x the LoRA parameters from the second
step on). A budget of 1.6 MB therefore fails the plain step *during its forward pass* (before
the loss, so a failed attempt records no sample) and fits either escalation. The planner's
first rung, ``loss='chunked'``, saves little at a vocabulary of 64 (1,730,244 B by the end of
the forward pass); its second, ``loss='chunked', activations='int8'``, peaks at 1,257,040 B.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import torch

import ciuic
from ciuic.errors import BudgetExceededError, NothingFitsError
from ciuic.optim import CiuicAdamW
from ciuic.planner.escalate import escalations
from ciuic.recovery import MicroBatch, Recovery, Rung, budget_guard, split_batch
from tests.gpu import requires_cuda
from tests.models import deepseek_v3, lora, progressions

BUDGET = 1_600_000
"""Between the plain step's forward (1,731,272 B) and the escalated steps' peaks (see above)."""

OFF = ciuic.CiuicConfig(budget=BUDGET)
CHECKPOINTED = ciuic.CiuicConfig(budget=BUDGET, checkpointing="full")


def batches(count: int = 2, *, rows: int = 4, padded: bool = False) -> list[dict[str, torch.Tensor]]:
    """``count`` batches with a ``sample_id`` per row; ``padded``: rows with fewer valid labels."""
    found = []
    for index in range(count):
        tokens = progressions(batch_size=rows, seq_len=32, seed=index)
        labels = tokens.clone()
        if padded:
            for row in range(rows):
                labels[row, 32 - 7 * row :] = -100  # row r has 7 r fewer valid tokens
        ids = torch.arange(index * rows, (index + 1) * rows)
        found.append({"input_ids": tokens, "labels": labels, "sample_id": ids})
    return found


class Job:
    """A model, its handle and optimizer, and the step ``Recovery`` runs; records what it saw."""

    def __init__(self, config: ciuic.CiuicConfig, *, optimizer: str = "adamw") -> None:
        self.model = lora(deepseek_v3())
        self.handle = ciuic.apply_(self.model, config)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if optimizer == "adamw":
            self.optimizer: torch.optim.Optimizer = torch.optim.AdamW(params, lr=1e-2)
        else:
            self.optimizer = CiuicAdamW(params, lr=1e-2, step_in_backward=True)
        self.steps = 0
        self.optimizer.register_step_post_hook(lambda *args: self._stepped())
        self.seen: list[int] = []  # sample ids that reached the loss
        self.fail: Callable[[], bool] = lambda: False  # inject a real OOM in backward when True

    def _stepped(self) -> None:
        self.steps += 1

    def step(self, micro: MicroBatch) -> torch.Tensor:
        batch = dict(micro.batch)
        ids = batch.pop("sample_id")
        with self.handle.step_scope():
            loss = self.model(**batch).loss
            self.seen.extend(ids.tolist())
            (loss * micro.weight).backward()
        return loss.detach() * micro.weight

    def train(self, recovery: Recovery | None, data: list[dict[str, torch.Tensor]], parts: int = 1) -> None:
        """Each batch through ``recovery`` (or split into ``parts`` by hand), then one step."""
        for batch in data:
            if recovery is not None:
                recovery.run(self.step, batch, optimizer=self.optimizer)
            else:
                for micro in split_batch(batch, parts):
                    self.step(micro)
            self.optimizer.step()
            self.optimizer.zero_grad()

    def trainable(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    def inject_backward_oom(self, when: Callable[[], bool]) -> None:
        """A real ``torch.OutOfMemoryError`` from the first decoder layer's backward (after the
        later layers' gradients, and step-in-backward updates, already happened)."""
        layer = self.model.get_base_model().model.layers[0]

        def hook(module: Any, grad_output: Any) -> None:
            if when():
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")

        layer.register_full_backward_pre_hook(hook)


def assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_budget_exceeded_is_an_out_of_memory_error_with_the_figures() -> None:
    model = torch.nn.Linear(64, 64)  # 16,640 B of parameters
    meter = ciuic.MemoryMeter(device="cpu", track=(model,), budget=20_000)
    with pytest.raises(torch.OutOfMemoryError) as caught, meter:
        model(torch.randn(8, 64)).sum().backward()
    error = caught.value
    assert isinstance(error, BudgetExceededError)
    assert error.budget == 20_000 and error.peak_bytes > 20_000
    assert "over the budget of" in str(error) and f"{error.peak_bytes:,} B" in str(error)


def test_checkpointing_escalation_is_bitwise_the_run_checkpointed_from_the_start(
    caplog: pytest.LogCaptureFixture,
) -> None:
    data = batches()
    ladder = [Rung(CHECKPOINTED)]
    job = Job(OFF)
    recovery = Recovery(job.handle, ladder)
    with caplog.at_level(logging.WARNING, logger="ciuic.recovery"):
        job.train(recovery, data)
    reference = Job(CHECKPOINTED)
    reference.train(Recovery(reference.handle, []), data)

    assert recovery.tried == [Rung(OFF), Rung(CHECKPOINTED)]
    assert job.handle.config == CHECKPOINTED
    assert [r.getMessage() for r in caplog.records if "retrying the same batch" in r.getMessage()] == [
        f"ciuic: out of memory under all techniques off (peak {ciuic.units.format_bytes(recovery.escalations[0].peak_bytes)}); "  # noqa: E501
        "retrying the same batch under checkpointing='full'"
    ]
    assert Counter(job.seen) == Counter(range(8)) == Counter(reference.seen)
    assert job.steps == reference.steps == 2
    assert_equal(job.trainable(), reference.trainable())
    assert "checkpointing='full'" in recovery.report()


def test_micro_batch_escalation_keeps_the_per_token_mean_of_the_whole_batch() -> None:
    data = batches(padded=True)  # valid tokens per row: 31, 25, 18, 11 (uneven halves)
    ladder = [Rung(OFF, micro_batches=2)]
    job = Job(OFF)
    recovery = Recovery(job.handle, ladder)
    job.train(recovery, data)
    by_hand = Job(OFF.replace(budget=None))
    by_hand.train(None, data, parts=2)
    whole = Job(OFF.replace(budget=None))
    whole.train(None, data, parts=1)

    assert recovery.tried == [Rung(OFF), Rung(OFF, micro_batches=2)]
    assert Counter(job.seen) == Counter(range(8)) == Counter(whole.seen)
    assert job.steps == whole.steps == 2
    assert_equal(job.trainable(), by_hand.trainable())  # the escalated run from the start


def test_micro_batch_gradients_equal_the_whole_batch_not_the_mean_of_means() -> None:
    # fp32, different summation order: the gradients agree to float rounding (rtol 1e-5),
    # while the mean of micro-batch means (what HF's auto_find_batch_size-style halving and a
    # naive accumulation give) is off by the token imbalance, about 10%.
    (batch,) = batches(1, padded=True)
    grads = {}
    for name, parts, weighted in (("whole", 1, True), ("split", 2, True), ("mean_of_means", 2, False)):
        job = Job(OFF.replace(budget=None))
        for micro in split_batch(batch, parts):
            inputs = {k: v for k, v in micro.batch.items() if k != "sample_id"}
            loss = job.model(**inputs).loss
            (loss * (micro.weight if weighted else 1 / parts)).backward()
        grads[name] = torch.cat([p.grad.flatten() for p in job.model.parameters() if p.grad is not None])
    torch.testing.assert_close(grads["split"], grads["whole"], rtol=1e-5, atol=1e-8)
    relative = (grads["mean_of_means"] - grads["whole"]).norm() / grads["whole"].norm()
    assert relative > 0.01


def test_compression_escalation_matches_the_compressed_run_from_the_start() -> None:
    data = batches()
    chunked, int8 = escalations(OFF)[:2]  # the planner's order: chunked loss, then int8 too
    assert int8 == OFF.replace(loss="chunked", activations="int8")
    job = Job(OFF)
    recovery = Recovery(job.handle)
    job.train(recovery, data)
    reference = Job(int8)
    reference.train(Recovery(reference.handle, []), data)

    assert recovery.tried == [Rung(OFF), Rung(chunked), Rung(int8)]
    assert Counter(job.seen) == Counter(range(8))
    # Re-applying the codec restarts its rounding generator from its seed, as applying it at
    # the start does: the retried run is bitwise the chunked + int8 run (tolerance 0).
    assert_equal(job.trainable(), reference.trainable())


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # the injection hook; no input needs grad
def test_injected_ooms_walk_the_ladder_in_order(caplog: pytest.LogCaptureFixture) -> None:
    # accelerate's find_executable_batch_size test, by type: fail until 4 micro-batches.
    start = ciuic.CiuicConfig()
    job = Job(start)
    recovery = Recovery(job.handle)
    job.inject_backward_oom(lambda: recovery.rung.micro_batches < 4)
    with caplog.at_level(logging.WARNING, logger="ciuic.recovery"):
        job.train(recovery, batches(1))

    last = ciuic.CiuicConfig(
        loss="chunked", activations="int4", checkpointing="full", offload={"activations"}
    )
    assert recovery.tried == [
        Rung(start),
        Rung(ciuic.CiuicConfig(loss="chunked")),
        Rung(ciuic.CiuicConfig(loss="chunked", activations="int8")),
        Rung(ciuic.CiuicConfig(loss="chunked", activations="int4")),
        Rung(ciuic.CiuicConfig(loss="chunked", activations="int4", checkpointing=2)),
        Rung(ciuic.CiuicConfig(loss="chunked", activations="int4", checkpointing="full")),
        Rung(last),
        Rung(last, micro_batches=2),
        Rung(last, micro_batches=4),
    ]
    assert [rung.config for rung in recovery.tried[1:7]] == escalations(start)
    assert len([r for r in caplog.records if "retrying the same batch" in r.getMessage()]) == 8
    assert job.handle.config == last
    assert job.steps == 1 and recovery.steps == 1


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # the injection hook; no input needs grad
def test_backward_oom_after_updates_in_backward_rolls_them_back_bitwise() -> None:
    data = batches()
    config = ciuic.CiuicConfig()
    job = Job(config, optimizer="step_in_backward")
    recovery = Recovery(job.handle, [Rung(config, micro_batches=2)])
    attempts = []

    def fail_first() -> bool:
        attempts.append(recovery.rung)
        return len(attempts) == 1  # the first backward dies after the later layers stepped

    job.inject_backward_oom(fail_first)
    job.train(recovery, data)
    reference = Job(config, optimizer="step_in_backward")
    reference.optimizer.accumulation_steps = 2  # what Recovery sets while it splits
    reference.train(None, data, parts=2)

    assert recovery.tried == [Rung(config), Rung(config, micro_batches=2)]
    assert all(state["step"] == 2 for state in job.optimizer.state.values())  # once per batch
    assert job.optimizer.accumulation_steps == 1
    assert_equal(job.trainable(), reference.trainable())


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # the injection hook; no input needs grad
def test_a_retried_batch_keeps_the_gradients_of_earlier_micro_batches() -> None:
    # Mid gradient-accumulation window: the gradients already there are kept, the failed
    # backward's partial ones are not added.
    first, second = batches()
    job = Job(ciuic.CiuicConfig())
    recovery = Recovery(job.handle, [Rung(CHECKPOINTED.replace(budget=None))])
    recovery.run(job.step, first)
    failing = [True]
    job.inject_backward_oom(lambda: failing.pop() if failing else False)
    recovery.run(job.step, second)
    reference = Job(ciuic.CiuicConfig())
    reference.step(split_batch(first, 1)[0])
    reference.step(split_batch(second, 1)[0])
    for (name, p), q in zip(job.model.named_parameters(), reference.model.parameters(), strict=True):
        if p.requires_grad:
            # the checkpointed recomputation is bitwise the forward it replaces
            assert torch.equal(p.grad, q.grad), name


def test_nothing_fits_says_what_was_tried_and_the_peak() -> None:
    job = Job(ciuic.CiuicConfig(budget=600_000))  # the model alone is 400,560 B
    recovery = Recovery(job.handle)
    (batch,) = batches(1)
    with ciuic.MemoryMeter(device="cpu", track=(job.model, job.optimizer)) as outside:
        before = outside.current_bytes
        with pytest.raises(NothingFitsError) as caught:
            recovery.run(job.step, batch, optimizer=job.optimizer)
        # each failed attempt's graph, activations and gradients were freed: nothing is left
        assert outside.current_bytes == before
        assert outside.peak_bytes > 600_000  # the attempts did run up to the budget
    message = str(caught.value)
    assert len(recovery.tried) == 9  # the start, the planner's 6 configs, 2 and 4 micro-batches
    assert "micro_batches=4" in message and "micro_batches=8" not in message  # 4 rows
    assert "Nothing in the ladder fits" in message and "over the budget of 585.94 KiB" in message
    assert job.seen == [] and job.steps == 0
    assert all(p.grad is None for p in job.model.parameters())


@requires_cuda
def test_on_cuda_the_budget_caps_the_allocator() -> None:
    device = torch.device("cuda")
    mib = 2**20
    with pytest.raises(torch.OutOfMemoryError), budget_guard(64 * mib, device):
        torch.empty(128 * mib, dtype=torch.uint8, device=device)
    assert torch.empty(128 * mib, dtype=torch.uint8, device=device).numel() == 128 * mib  # cap lifted
