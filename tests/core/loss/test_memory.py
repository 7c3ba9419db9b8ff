"""What the chunked loss costs in memory at full DeepSeek-R1-Distill-Qwen-7B size (fake tensors)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from ciuic import MemoryMeter
from ciuic.loss import chunk_rows, linear_cross_entropy, reference_linear_cross_entropy

TOKENS, HIDDEN, VOCAB = 8192, 3584, 152064  # 8k tokens of DeepSeek-R1-Distill-Qwen-7B
BF16 = 2
GiB = 2**30
SMALL_VECTORS = 64 * 2**10  # per-token loss, mask, max, norm of one chunk: a few KiB


def measure(loss_fn: Any, *, trainable_head: bool, tokens: int = TOKENS) -> MemoryMeter:
    """The meter around one forward+backward of ``loss_fn`` at 7B size, on fake tensors."""
    with FakeTensorMode():
        hidden = torch.empty(tokens, HIDDEN, dtype=torch.bfloat16, requires_grad=True)
        weight = torch.empty(VOCAB, HIDDEN, dtype=torch.bfloat16, requires_grad=trainable_head)
        target = torch.empty(tokens, dtype=torch.long).random_(0, VOCAB)
        with MemoryMeter() as meter:
            loss_fn(hidden, weight, target).backward()
    return meter


def _gradient_bytes(trainable_head: bool) -> int:
    """The gradients the loss hands out, which both paths must produce: not transient."""
    return TOKENS * HIDDEN * BF16 + (VOCAB * HIDDEN * BF16 if trainable_head else 0)


@pytest.mark.parametrize("trainable_head", [False, True], ids=["frozen_head", "trainable_head"])
def test_transient_peak_at_8k_tokens_and_152k_vocab(trainable_head: bool) -> None:
    chunked = measure(linear_cross_entropy, trainable_head=trainable_head)
    standard = measure(reference_linear_cross_entropy, trainable_head=trainable_head)
    gradients = _gradient_bytes(trainable_head)
    transient = chunked.peak_bytes - gradients
    # One chunk's fp32 logits and their bf16 copy (matmul output, later the logit gradient).
    chunk = chunk_rows(VOCAB, HIDDEN, torch.bfloat16) * VOCAB * (4 + BF16)
    assert chunk <= transient <= chunk + SMALL_VECTORS
    assert transient <= 1.2 * GiB
    # The standard path holds bf16 logits, their fp32 copy, softmax and gradient: over 9 GiB more.
    assert standard.peak_bytes - gradients >= 9 * GiB
    assert standard.peak_bytes >= 10 * chunked.peak_bytes


def test_frozen_head_total_peak() -> None:
    """Under LoRA the lm_head is frozen: the loss's whole footprint is one chunk plus dL/dh."""
    assert measure(linear_cross_entropy, trainable_head=False).peak_bytes <= 0.3 * GiB


def test_a_frozen_head_read_in_row_blocks_is_never_dense() -> None:
    """A quantized head (int8 codes here) read through ``FrozenRows``: one dense block at a time."""
    from ciuic.loss import FrozenRows
    from ciuic.loss.functional import ROW_BLOCK_BYTES

    with FakeTensorMode():
        hidden = torch.empty(TOKENS, HIDDEN, dtype=torch.bfloat16, requires_grad=True)
        codes = torch.empty(VOCAB, HIDDEN, dtype=torch.int8)
        target = torch.empty(TOKENS, dtype=torch.long).random_(0, VOCAB)
        rows = lambda a, b: codes[a:b].to(torch.bfloat16)  # noqa: E731  (a dequantization's new block)
        head = FrozenRows(rows, codes.shape, torch.bfloat16, codes.device)
        with MemoryMeter() as meter:
            linear_cross_entropy(hidden, head, target).backward()
    held = meter.peak_bytes - _gradient_bytes(False)  # less dL/dh (the codes predate the meter)
    chunk = chunk_rows(VOCAB, HIDDEN, torch.bfloat16) * VOCAB * (4 + BF16)
    block_rows = ROW_BLOCK_BYTES // (HIDDEN * BF16)
    rows = chunk_rows(VOCAB, HIDDEN, torch.bfloat16)
    # A chunk's logits, one dense block, that block's logits before they are copied in, and
    # the fp32 sum of the hidden-state gradient: about 0.29 GiB, never the 1.02 GiB dense head.
    extra = ROW_BLOCK_BYTES + rows * block_rows * BF16 + rows * HIDDEN * 4
    assert chunk <= held <= chunk + extra + SMALL_VECTORS
    assert held < VOCAB * HIDDEN * BF16 / 3
