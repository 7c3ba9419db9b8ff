"""``loss='chunked'`` on Hugging Face causal LMs: same losses, no training logits, reversible."""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ciuic
from ciuic import ConfigError
from ciuic.errors import ApplyError
from ciuic.loss import apply_chunked_loss, chunk_rows
from tests.models import COPIES, deepseek_v3, lora, progressions, qwen2

CHUNKED = ciuic.CiuicConfig(loss="chunked")
SMALL_CHUNKS = 4096  # 8 tokens a chunk at vocabulary 64, hidden 64: every batch walks many chunks


def _batch(seed: int = 0, batch_size: int = 2, seq_len: int = 24) -> torch.Tensor:
    return progressions(batch_size=batch_size, seq_len=seq_len, seed=seed)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


MODELS: dict[str, Callable[[], nn.Module]] = {"qwen2": qwen2, "deepseek_v3": deepseek_v3}


@pytest.mark.parametrize("build", MODELS.values(), ids=list(MODELS))
def test_loss_and_gradients_equal_the_models_own(build: Callable[[], nn.Module]) -> None:
    model = build()
    reference = copy.deepcopy(model)
    handle = ciuic.apply_(model, CHUNKED)
    assert [a.technique for a in handle.applied] == ["loss"]
    ids = _batch()
    out, ref = model(input_ids=ids, labels=ids), reference(input_ids=ids, labels=ids)
    assert out.logits is None and ref.logits.shape == (*ids.shape, 64)
    assert abs(out.loss.item() - ref.loss.item()) <= 1e-5 * ref.loss.item()
    out.loss.backward()
    ref.loss.backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None and q.grad.norm() > 0:
            assert _rel(p.grad, q.grad) <= 1e-5, name


def train(model: nn.Module, steps: int, lr: float = 3e-3) -> list[float]:
    """``steps`` of AdamW on the progression task; the loss of each step.

    At lr 1e-2 full fine-tuning of the tiny Qwen2 is chaotic: fp32 reordering alone (one chunk or
    many) drives the runs apart (``python bench/loss.py`` prints the gap). At 3e-3 the task is
    still learned and the runs stay close.
    """
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for step in range(steps):
        ids = _batch(seed=step)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


TRAINING: dict[str, Callable[[], nn.Module]] = {
    "qwen2_full_finetuning": lambda: qwen2(seed=1),
    "deepseek_v3_lora_and_trainable_head": lambda: lora_with_head(deepseek_v3(seed=1)),
}


def lora_with_head(model: nn.Module) -> nn.Module:
    """The demo's setup: LoRA on the projections, lm_head and embeddings fully trained."""
    from peft import LoraConfig, get_peft_model

    from ciuic.demo import LORA_TARGETS

    config = LoraConfig(r=8, target_modules=list(LORA_TARGETS), modules_to_save=["lm_head", "embed_tokens"])
    return get_peft_model(model, config)


@pytest.mark.parametrize("build", TRAINING.values(), ids=list(TRAINING))
def test_100_steps_track_the_standard_loss(build: Callable[[], nn.Module]) -> None:
    standard, chunked = build(), build()
    apply_chunked_loss(chunked, chunk_bytes=SMALL_CHUNKS)
    expected, got = train(standard, 100), train(chunked, 100)
    assert expected[-1] < 0.5 * expected[0]  # the task is learned, so the comparison means something
    for step, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert abs(a - b) <= 1e-4 * b, f"step {step}: chunked {a} vs standard {b}"


def test_calls_without_labels_are_untouched() -> None:
    model, reference = qwen2(), qwen2()
    ciuic.apply_(model, CHUNKED)
    ids = _batch()
    assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    kept = model(input_ids=ids, logits_to_keep=1)
    assert torch.equal(kept.logits, reference(input_ids=ids, logits_to_keep=1).logits)


def test_tuple_output_and_num_items_in_batch() -> None:
    model, reference = qwen2(), qwen2()
    apply_chunked_loss(model, chunk_bytes=SMALL_CHUNKS)
    ids = _batch()
    ids_labels = ids.clone()
    ids_labels[0, :10] = -100
    got = model(input_ids=ids, labels=ids_labels, num_items_in_batch=40, return_dict=False)
    ref = reference(input_ids=ids, labels=ids_labels, num_items_in_batch=40, return_dict=False)
    # A ModelOutput's tuple drops None fields: (loss, cache) where the model gives (loss, logits, cache).
    assert isinstance(got, tuple) and len(got) == len(ref) - 1 and got[0].ndim == 0
    assert abs(got[0].item() - ref[0].item()) <= 1e-5 * ref[0].item()


def test_remove_restores_the_model() -> None:
    model, untouched = deepseek_v3(), deepseek_v3()
    ciuic.apply_(model, CHUNKED)
    ciuic.remove_(model)
    assert "forward" not in model.__dict__
    ids = _batch()
    out, ref = model(input_ids=ids, labels=ids), untouched(input_ids=ids, labels=ids)
    assert torch.equal(out.logits, ref.logits) and torch.equal(out.loss, ref.loss)




@pytest.mark.parametrize("duplicate", COPIES.values(), ids=list(COPIES))
def test_a_copy_of_a_patched_model_trains_bitwise_like_the_original(
    duplicate: Callable[[nn.Module], nn.Module],
) -> None:
    model = lora(deepseek_v3())
    apply_chunked_loss(model, chunk_bytes=SMALL_CHUNKS)
    clone = duplicate(model)
    inner = clone.base_model.model
    assert inner.forward.module is inner  # the copy's patch drives the copy, not the original
    ids = _batch()
    out, copied = model(input_ids=ids, labels=ids), clone(input_ids=ids, labels=ids)
    assert copied.logits is None and torch.equal(copied.loss, out.loss)
    out.loss.backward()
    copied.loss.backward()
    pairs = zip(model.named_parameters(), clone.parameters(), strict=True)
    grads = [(name, p.grad, q.grad) for (name, p), q in pairs if p.grad is not None]
    assert grads and [name for name, g, h in grads if not torch.equal(g, h)] == []


@pytest.mark.parametrize("duplicate", COPIES.values(), ids=list(COPIES))
def test_the_undo_of_a_copied_handle_restores_the_copy(duplicate: Callable[[Any], Any]) -> None:
    model = qwen2()
    applied = apply_chunked_loss(model)
    holder = nn.Module()  # torch.save and pickle take the pair in one graph, as a checkpoint would
    holder.model, holder.applied = model, applied
    copied = duplicate(holder)
    copied.applied.undo()
    assert "forward" not in copied.model.__dict__ and "forward" in model.__dict__
    ids = _batch()
    assert copied.model(input_ids=ids, labels=ids).logits is not None
    assert model(input_ids=ids, labels=ids).logits is None


def test_the_patched_forward_keeps_the_models_signature() -> None:
    """transformers.Trainer keeps only the dataset columns model.forward names."""
    model, reference = qwen2(), qwen2()
    apply_chunked_loss(model)
    assert inspect.signature(model.forward) == inspect.signature(reference.forward)
    assert "input_ids" in inspect.signature(lora(model).get_base_model().forward).parameters


@pytest.mark.parametrize("mode", ["eval", "no_grad"])
def test_evaluation_takes_the_models_own_path(mode: str) -> None:
    model, reference = qwen2(), qwen2()
    apply_chunked_loss(model, chunk_bytes=SMALL_CHUNKS)
    if mode == "eval":
        model.eval(), reference.eval()
    ids = _batch()
    with torch.no_grad() if mode == "no_grad" else contextlib.nullcontext():
        out, ref = model(input_ids=ids, labels=ids), reference(input_ids=ids, labels=ids)
    assert torch.equal(out.logits, ref.logits) and torch.equal(out.loss, ref.loss)


def test_training_logits_are_the_models_own_and_detached() -> None:
    model, reference = deepseek_v3(), deepseek_v3()
    applied = apply_chunked_loss(model, chunk_bytes=SMALL_CHUNKS, training_logits=True)
    assert applied.details["training_logits"] is True
    ids = _batch()
    out, ref = model(input_ids=ids, labels=ids), reference(input_ids=ids, labels=ids)
    assert torch.equal(out.logits, ref.logits) and not out.logits.requires_grad
    assert abs(out.loss.item() - ref.loss.item()) <= 1e-5 * ref.loss.item()
    got = model(input_ids=ids, labels=ids, return_dict=False)
    assert torch.equal(got[1], ref.logits)  # the tuple form keeps them in the model's position
    out.loss.backward()  # the logits took no part in the graph: one backward, as without them


@pytest.mark.parametrize("value", [1, "yes", None])
def test_bad_training_logits(value: Any) -> None:
    message = rf"training_logits={value!r} is not allowed. Allowed: True or False"
    with pytest.raises(ConfigError, match=message):
        apply_chunked_loss(qwen2(), training_logits=value)


class DenseWeightHead(nn.Module):
    """A frozen head stored in bf16 that computes in its input's dtype, implementing the
    dense-weight protocol the way a quantized head would (storage other than nn.Linear's)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.register_buffer("stored", linear.weight.detach().to(torch.bfloat16))
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.stored.to(x.dtype))

    def ciuic_dense_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        self.calls += 1
        return self.stored, None


def test_a_head_with_the_dense_weight_protocol_is_chunked() -> None:
    model, reference = qwen2(), qwen2()
    for lm in (model, reference):
        lm.lm_head = DenseWeightHead(lm.lm_head)
    applied = apply_chunked_loss(model, chunk_bytes=SMALL_CHUNKS, training_logits=True)
    assert applied.changed == ["<root> (Qwen2ForCausalLM)"]
    assert applied.details["chunk_tokens"] == chunk_rows(64, 64, torch.bfloat16, chunk_bytes=SMALL_CHUNKS)
    ids = _batch()
    calls = model.lm_head.calls
    out, ref = model(input_ids=ids, labels=ids), reference(input_ids=ids, labels=ids)
    assert model.lm_head.calls == calls + 1  # the loss used the protocol's weight
    assert torch.equal(out.logits, ref.logits)
    assert abs(out.loss.item() - ref.loss.item()) <= 1e-5 * ref.loss.item()
    out.loss.backward()
    ref.loss.backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert _rel(p.grad, q.grad) <= 1e-5, name


def test_a_dense_weight_of_the_wrong_form_is_named() -> None:
    class Broken(DenseWeightHead):
        def ciuic_dense_weight(self) -> Any:
            return self.stored

    model = qwen2()
    model.lm_head = Broken(model.lm_head)
    with pytest.raises(TypeError, match=r"Broken.ciuic_dense_weight\(\) returned Tensor: it must return"):
        apply_chunked_loss(model)


def test_peft_model_is_patched_through_its_inner_model() -> None:
    model = lora(qwen2())
    applied = apply_chunked_loss(model)
    assert applied.changed == ["base_model.model (Qwen2ForCausalLM)"]
    ids = _batch()
    out = model(input_ids=ids, labels=ids)
    assert out.logits is None
    out.loss.backward()
    trained = [n for n, p in model.named_parameters() if p.grad is not None]
    assert trained and all("lora_" in n for n in trained)


def test_lora_on_lm_head_is_refused_with_the_fix() -> None:
    model = lora(qwen2(), targets=("q_proj", "lm_head"))
    with pytest.raises(ApplyError, match=r"loss='chunked' found no causal-LM head.*leave lm_head out"):
        ciuic.apply_(model, CHUNKED)


def test_a_model_without_lm_head_is_refused() -> None:
    with pytest.raises(ApplyError, match="no submodule has an lm_head"):
        ciuic.apply_(nn.Sequential(nn.Linear(4, 4)), CHUNKED)


def test_applying_twice_is_refused_whichever_door() -> None:
    model = qwen2()
    apply_chunked_loss(model)
    with pytest.raises(ApplyError, match="already applied"):
        apply_chunked_loss(model)
    with pytest.raises(ApplyError, match="already applied"):
        ciuic.apply_(model, CHUNKED)
    ciuic.remove_(model)
    ciuic.apply_(model, CHUNKED)
    with pytest.raises(ApplyError, match="already applied"):
        apply_chunked_loss(model)


@pytest.mark.parametrize("chunk_bytes", [0, -1, 1.5, True])
def test_bad_chunk_bytes(chunk_bytes: Any) -> None:
    with pytest.raises(ConfigError, match=f"chunk_bytes={chunk_bytes!r} is not allowed"):
        apply_chunked_loss(qwen2(), chunk_bytes=chunk_bytes)


def test_a_quantized_head_is_read_in_row_blocks_by_the_training_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    """An int8 ``lm_head`` under the chunked loss: dequantized 10 rows at a time, never whole."""
    from ciuic.loss import functional
    from ciuic.weights.tables import QuantizedHead

    monkeypatch.setattr(functional, "ROW_BLOCK_BYTES", 10 * 64 * 4)  # 10 fp32 rows of 64
    config = ciuic.CiuicConfig(weights={"format": "none", "head": "int8"}, loss="chunked")
    blocked, dense = qwen2(vocab_size=256), qwen2(vocab_size=256)
    for model in (blocked, dense):
        model.requires_grad_(False).model.norm.weight.requires_grad_(True)  # dL/dh reaches it
        ciuic.apply_(model, config)
    assert isinstance(blocked.lm_head, QuantizedHead)
    reads: list[int] = []
    read = blocked.lm_head.ciuic_dense_rows
    blocked.lm_head.ciuic_dense_rows = lambda a, b: reads.append(b - a) or read(a, b)  # type: ignore[method-assign]
    dense.lm_head.ciuic_dense_rows = None  # type: ignore[method-assign, assignment]  (the dense-weight path)
    ids = _batch()
    losses = []
    for model in (blocked, dense):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
    assert reads and max(reads) == 10 and sum(reads) % 256 == 0
    assert _rel(losses[0], losses[1]) <= 1e-6
    assert _rel(blocked.model.norm.weight.grad, dense.model.norm.weight.grad) <= 1e-5
