"""Fused linear + cross-entropy that never holds the full logits.

A causal-LM loss usually runs ``lm_head`` over every token and then cross-entropy over the
``(tokens, vocab)`` logits: the logits exist in the model dtype, again in fp32, as their
softmax and as their gradient. At 8k tokens and DeepSeek's 152k vocabulary that is over
10 GiB. :func:`linear_cross_entropy` walks the tokens in chunks instead: for each chunk it
computes the logits (softmax in fp32), the loss and, in the same pass, the gradient with
respect to the hidden states and the ``lm_head`` weight; backward only scales those
gradients. The largest transient is one chunk's logits, sized by ``chunk_bytes``. This is the
scheme of Liger-Kernel's ``FusedLinearCrossEntropy`` (Hsu et al., 2024, arXiv:2410.10989)
written in plain PyTorch ops, so it runs on any device and under ``FakeTensorMode``.

:func:`reference_linear_cross_entropy` is the standard path (materialized logits, as
transformers' ``ForCausalLMLoss`` computes it), kept for tests and benchmarks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor

from ciuic.errors import ConfigError
from ciuic.memory import tag_allocations

DEFAULT_CHUNK_BYTES = 256 * 2**20
"""Default byte target of one chunk's logit-sized buffers (fp32 logits plus their low-precision
copy): 256 MiB, i.e. about 290 tokens per chunk for a 152k vocabulary in bf16."""

ROW_BLOCK_BYTES = 64 * 2**20
"""Byte target of one dense block of a :class:`FrozenRows` weight."""


@dataclasses.dataclass(frozen=True)
class FrozenRows:
    """A frozen ``(vocab_size, hidden_size)`` ``lm_head`` weight read a block of rows at a time.

    :func:`linear_cross_entropy` takes it in place of the weight tensor: each chunk's logits and
    hidden-state gradient are computed block by block over the vocabulary, so only one dense
    block exists at a time. A quantized head (:class:`ciuic.weights.tables.QuantizedHead`)
    gives one: at 152,064 x 3,584 its dense bf16 copy (1.02 GiB) is never built. The price is
    reading (dequantizing) every block twice per chunk. The weight gets no gradient.

    Args:
        read: ``read(start, stop)`` -> the dense rows ``start:stop``.
        shape: ``(vocab_size, hidden_size)``.
        dtype: The dtype the rows are used in (``read``'s result is cast to it).
        device: Where ``read`` puts the rows.
        block: Rows per block; 0 picks about :data:`ROW_BLOCK_BYTES` a block.

    Example:
        >>> import torch
        >>> w = torch.randn(100, 16)
        >>> frozen = FrozenRows(lambda a, b: w[a:b], w.shape, w.dtype, w.device, block=32)
        >>> h, y = torch.randn(5, 16), torch.randint(0, 100, (5,))
        >>> torch.allclose(linear_cross_entropy(h, frozen, y), linear_cross_entropy(h, w, y))
        True
    """

    read: Callable[[int, int], torch.Tensor]
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device
    block: int = 0

    ndim = 2
    requires_grad = False

    def to(self, dtype: torch.dtype) -> FrozenRows:
        """The same rows used in ``dtype``."""
        return dataclasses.replace(self, dtype=dtype)

    def blocks(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        """``(start, stop, dense rows)`` over the vocabulary, one block alive at a time."""
        vocab, hidden = self.shape
        rows = self.block or max(1, ROW_BLOCK_BYTES // (hidden * self.dtype.itemsize))
        for start in range(0, vocab, rows):
            stop = min(vocab, start + rows)
            yield start, stop, self.read(start, stop).to(self.dtype)

    def dense(self) -> torch.Tensor:
        """The whole dense weight (for the few callers that need it, e.g. evaluation logits)."""
        return self.read(0, self.shape[0]).to(self.dtype)


Weight = torch.Tensor | FrozenRows
"""An ``lm_head`` weight :func:`linear_cross_entropy` takes."""


REDUCTIONS = ("mean", "sum")
"""Allowed ``reduction`` values (``"none"`` would need the per-token losses, not a scalar)."""


def chunk_rows(
    vocab_size: int,
    hidden_size: int,
    dtype: torch.dtype = torch.bfloat16,
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    softcap: bool = False,
) -> int:
    """How many tokens one chunk holds so that its transient stays near ``chunk_bytes``.

    One token of a chunk costs its fp32 logits (``4 * vocab_size`` bytes), their copy in
    ``dtype`` when that is narrower than fp32 (the ``lm_head`` output, later the gradient fed
    to the matmuls), a second fp32 row with soft-capping, and its ``hidden_size`` row of the
    hidden-state gradient.

    Args:
        vocab_size: Rows of the ``lm_head`` weight.
        hidden_size: Columns of the ``lm_head`` weight.
        dtype: The ``lm_head`` compute dtype.
        chunk_bytes: Byte target of one chunk.
        softcap: Whether logit soft-capping is on (one more fp32 buffer).

    Returns:
        The number of tokens per chunk, at least 1 (a multiple of 8 when above 8, which suits
        tensor cores).

    Example:
        >>> chunk_rows(152064, 3584, torch.bfloat16)
        288
    """
    sizes = {"vocab_size": vocab_size, "hidden_size": hidden_size, "chunk_bytes": chunk_bytes}
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name}={value!r} is not allowed: give an int >= 1.")
    elem = torch.empty((), dtype=dtype, device="meta").element_size()
    per_logit = 4 + (elem if elem < 4 else 0) + (4 if softcap else 0)
    per_row = vocab_size * per_logit + hidden_size * elem
    rows = max(1, chunk_bytes // per_row)
    return rows - rows % 8 if rows > 8 else rows


def _check_inputs(
    hidden: torch.Tensor,
    weight: Weight,
    target: torch.Tensor,
    bias: torch.Tensor | None,
    reduction: str,
    num_items_in_batch: Any,
    softcap: float | None,
    logit_scale: float | None,
    shift: bool,
) -> None:
    if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point() or hidden.ndim < 1:
        raise ValueError(
            f"hidden={_describe(hidden)} must be a floating-point tensor of shape (..., hidden_size)."
        )
    known = isinstance(weight, (torch.Tensor, FrozenRows))
    if not known or weight.ndim != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight={_describe(weight)} must be the lm_head weight of shape "
            f"(vocab_size, {hidden.shape[-1]}) for hidden={_describe(hidden)}."
        )
    if not isinstance(target, torch.Tensor) or target.is_floating_point() or target.is_complex():
        raise ValueError(f"target={_describe(target)} must be an integer tensor of class indices.")
    if tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"target={_describe(target)} must have the shape of hidden without its last dimension, "
            f"{tuple(hidden.shape[:-1])}."
        )
    if shift and target.ndim < 1:
        raise ValueError("shift=True needs a target with a sequence dimension, e.g. (batch, seq_len).")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],)):
        raise ValueError(
            f"bias={_describe(bias)} must have shape ({weight.shape[0]},), one entry per weight row."
        )
    if reduction not in REDUCTIONS:
        allowed = ", ".join(map(repr, REDUCTIONS))
        raise ConfigError(f"reduction={reduction!r} is not allowed: choose one of {allowed}.")
    if num_items_in_batch is not None and reduction != "mean":
        raise ConfigError(
            f"num_items_in_batch={num_items_in_batch!r} with reduction={reduction!r}: num_items_in_batch "
            f"replaces the mean's divisor, so use reduction='mean' (or drop num_items_in_batch)."
        )
    for name, value in (("softcap", softcap), ("logit_scale", logit_scale)):
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if value is not None and not (number and value > 0):
            raise ConfigError(f"{name}={value!r} is not allowed: give a number > 0 or None.")
    tensors: list[Any] = [t for t in (weight, target, bias) if t is not None]
    if any(t.device != hidden.device for t in tensors):
        raise ValueError(
            f"hidden, weight, target and bias must be on one device, got "
            f"{[str(t.device) for t in (hidden, *tensors)]}: move the labels to the model's device."
        )


def _check_classes(target: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    """Class indices outside ``[0, vocab_size)`` would fail deep inside a chunk (or, on CUDA, as
    an asynchronous device assert); name them here instead. Skipped for fake and meta tensors,
    which hold no values."""
    if target.device.type == "meta" or isinstance(target, FakeTensor) or target.numel() == 0:
        return
    bad = (target != ignore_index) & ((target < 0) | (target >= vocab_size))
    if bool(bad.any()):
        first = int(target[bad].reshape(-1)[0])
        raise ValueError(
            f"target holds class index {first}, outside [0, {vocab_size}) for an lm_head of {vocab_size} "
            f"rows (ignore_index={ignore_index} marks tokens without a loss): check the labels and the "
            f"vocabulary size."
        )


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"Tensor(shape={tuple(value.shape)}, dtype={value.dtype})"
    return repr(value)


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except (RuntimeError, TypeError):  # a device type autocast does not know
        return None
    return None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: Weight,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | torch.Tensor | None = None,
    softcap: float | None = None,
    logit_scale: float | None = None,
    shift: bool = False,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> torch.Tensor:
    """``cross_entropy(linear(hidden, weight, bias), target)`` without the full logits.

    Equal (within floating-point reordering) to :func:`reference_linear_cross_entropy`: the
    logits are upcast to fp32 before the softmax, exactly as transformers does, and the
    gradients reach ``hidden``, ``weight`` and ``bias`` as far as each requires grad (a frozen
    ``lm_head``, as under LoRA, costs no weight gradient). Under ``torch.autocast`` the inputs
    are cast to the autocast dtype first, as ``nn.Linear`` would be.

    Args:
        hidden: Final hidden states, shape ``(..., hidden_size)``.
        weight: ``lm_head`` weight, shape ``(vocab_size, hidden_size)``, same dtype as ``hidden``;
            or a :class:`FrozenRows` (a frozen weight read in row blocks, never whole).
        target: Class indices, shape ``hidden.shape[:-1]``; ``ignore_index`` marks tokens
            without a loss.
        bias: Optional ``lm_head`` bias, shape ``(vocab_size,)``.
        ignore_index: Target value that contributes neither loss nor gradient.
        reduction: ``"mean"`` (over non-ignored tokens) or ``"sum"``.
        num_items_in_batch: If given, the loss is the sum divided by this count (how
            transformers 5 normalizes under gradient accumulation); needs ``reduction="mean"``.
        softcap: Logit soft-capping ``softcap * tanh(logits / softcap)`` (Gemma 2), or None.
        logit_scale: Factor the logits are multiplied by before soft-capping (Cohere's
            ``logit_scale``, Granite's ``1 / logits_scaling``), or None.
        shift: Treat ``target`` as unshifted causal-LM labels: position ``t`` predicts label
            ``t + 1`` and the last position has none (transformers' ``ForCausalLMLoss``).
        chunk_bytes: Byte target of one chunk's logit buffers (see :func:`chunk_rows`).

    Returns:
        The scalar fp32 loss. Its backward may run once (``retain_graph`` is not supported).

    Example:
        >>> import torch
        >>> h = torch.randn(2, 5, 16, requires_grad=True)
        >>> w = torch.randn(100, 16, requires_grad=True)
        >>> y = torch.randint(0, 100, (2, 5))
        >>> loss = linear_cross_entropy(h, w, y, shift=True, chunk_bytes=4096)
        >>> loss.backward()
        >>> ref = reference_linear_cross_entropy(h, w, y, shift=True)
        >>> torch.allclose(loss, ref)
        True
    """
    _check_inputs(hidden, weight, target, bias, reduction, num_items_in_batch, softcap, logit_scale, shift)
    _check_classes(target, weight.shape[0], ignore_index)
    if shift:
        target = _shift(target, ignore_index)
    cast = _autocast_dtype(hidden.device.type)
    if cast is not None:
        hidden, weight = hidden.to(cast), weight.to(cast)
        bias = None if bias is None else bias.to(cast)
    if weight.dtype != hidden.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise ValueError(
            f"hidden ({hidden.dtype}), weight ({weight.dtype}) and bias must share a dtype, as nn.Linear "
            f"requires outside autocast: cast hidden to the lm_head dtype."
        )
    size = hidden.shape[-1]
    capped = softcap is not None
    rows = chunk_rows(weight.shape[0], size, weight.dtype, chunk_bytes=chunk_bytes, softcap=capped)
    flat_target = target.reshape(-1)
    divisor: int | float | torch.Tensor
    if num_items_in_batch is not None:
        divisor = num_items_in_batch
    elif reduction == "mean":
        divisor = (flat_target != ignore_index).sum()
    else:
        divisor = 1
    with torch.autocast(hidden.device.type, enabled=False):
        loss: torch.Tensor = _ChunkedLinearCrossEntropy.apply(
            hidden.reshape(-1, size), weight, bias, flat_target, ignore_index, divisor, softcap, logit_scale,
            rows,
        )  # fmt: skip
    return loss


def _shift(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """``labels[..., 1:]`` padded with ``ignore_index``: what transformers' causal-LM loss does."""
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and, chunk by chunk, the input gradients; backward scales them.

    The gradients are kept as attributes of ``ctx`` rather than through ``save_for_backward``:
    they are not activations, and an activation codec (``saved_tensors_hooks``) must not
    compress them. They are allocated under ``tag_allocations("activations")`` so that
    ``MemoryMeter`` reports them as memory held for backward.
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: Weight,
        bias: torch.Tensor | None,
        target: torch.Tensor,
        ignore_index: int,
        divisor: int | float | torch.Tensor,
        softcap: float | None,
        logit_scale: float | None,
        rows: int,
    ) -> torch.Tensor:
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        with tag_allocations("activations"):
            grad_h = torch.empty_like(hidden) if need_h else None
            grad_w = torch.zeros_like(weight) if need_w and isinstance(weight, torch.Tensor) else None
            # The bias gradient sums every token's row: fp32, it is only vocab_size floats.
            grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b and bias is not None else None
        if isinstance(divisor, torch.Tensor):
            inv: float | torch.Tensor = 1.0 / divisor.to(device=hidden.device, dtype=torch.float32)
        else:
            inv = 1.0 / float(divisor) if divisor != 0 else float("inf")
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], rows):
            h = hidden[start : start + rows]
            g, chunk_loss = _chunk(h, weight, bias, target[start : start + rows], ignore_index, inv, softcap,
                                   logit_scale, need_grad=need_h or need_w or need_b)  # fmt: skip
            total += chunk_loss
            if g is None:
                continue
            if grad_h is not None:
                _grad_hidden(g, weight, grad_h[start : start + rows])
            if grad_w is not None:
                # Accumulated in the weight's dtype, as Liger-Kernel does: an fp32 accumulator
                # would cost twice the weight (2 GiB at 152k x 3584). In bf16 this rounds once
                # per chunk; tests/core/loss bounds the resulting error.
                grad_w.addmm_(g.t(), h)
            if grad_b is not None:
                grad_b += g.sum(0, dtype=torch.float32)
            del g  # before the next chunk's logits exist, or two chunks' buffers would coexist
        if grad_b is not None and bias is not None:
            grad_b = grad_b.to(bias.dtype)
        ctx.grads = (grad_h, grad_w, grad_b)
        return total * inv

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.grads is None:
            raise RuntimeError(
                "ciuic's chunked cross-entropy computed its gradients in forward and hands them out once: "
                "backward through it twice (retain_graph=True) is not supported; recompute the loss instead."
            )
        grads, ctx.grads = ctx.grads, None
        for grad in grads:
            if grad is not None:
                grad.mul_(grad_loss)  # in place: no second copy of a vocab-sized weight gradient
        return (*grads, None, None, None, None, None, None)


def _matmul_logits(h: torch.Tensor, weight: Weight, bias: torch.Tensor | None) -> torch.Tensor:
    if isinstance(weight, torch.Tensor):
        return torch.addmm(bias, h, weight.t()) if bias is not None else torch.mm(h, weight.t())
    raw = h.new_empty((h.shape[0], weight.shape[0]))
    for start, stop, block in weight.blocks():
        raw[:, start:stop] = torch.mm(h, block.t())
        del block
    return raw if bias is None else raw.add_(bias)


def _grad_hidden(g: torch.Tensor, weight: Weight, out: torch.Tensor) -> None:
    """``out = g @ weight``; over blocks the partial products are summed in fp32."""
    if isinstance(weight, torch.Tensor):
        torch.mm(g, weight, out=out)
        return
    total = torch.zeros(out.shape, dtype=torch.float32, device=out.device)
    for start, stop, block in weight.blocks():
        total += torch.mm(g[:, start:stop], block)
        del block
    out.copy_(total)


def _chunk(
    h: torch.Tensor,
    weight: Weight,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    ignore_index: int,
    inv: float | torch.Tensor,
    softcap: float | None,
    logit_scale: float | None,
    *,
    need_grad: bool,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """One chunk: its summed loss and, if asked, the gradient of the (scaled) loss w.r.t. its logits.

    Every step after the matmul is in place on one fp32 buffer, so a chunk costs that buffer,
    the matmul output in the model dtype (freed by the upcast) and the gradient's cast back to it.
    """
    raw = _matmul_logits(h, weight, bias)
    logits = raw.float()  # the same tensor when the model runs in fp32
    del raw
    if logit_scale is not None:
        logits.mul_(logit_scale)
    tanh = None
    if softcap is not None:
        tanh = logits.div_(softcap).tanh_()  # kept for the derivative 1 - tanh^2
        logits = tanh * softcap
    valid = target != ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target)).unsqueeze(1)
    picked = logits.gather(1, safe).squeeze(1)
    peak = logits.amax(1, keepdim=True)
    probs = logits.sub_(peak).exp_()  # exp(z - max), in place
    norm = probs.sum(1, keepdim=True)
    token_loss = (peak + norm.log()).squeeze(1) - picked
    chunk_loss = torch.where(valid, token_loss, torch.zeros_like(token_loss)).sum()
    if not need_grad:
        return None, chunk_loss
    probs.div_(norm)  # softmax
    probs.scatter_add_(1, safe, probs.new_full(safe.shape, -1.0))  # softmax - onehot(target)
    # where(), not a product with the mask: an all-ignored batch (inv = 1/0) keeps zero gradients.
    factor = inv * (1.0 if logit_scale is None else logit_scale)
    scale = torch.where(valid, factor, 0.0).to(probs.dtype) if torch.is_tensor(factor) else valid * factor
    probs.mul_(scale.unsqueeze(1))
    if tanh is not None:
        probs.mul_(tanh.square_().neg_().add_(1.0))  # d softcap(x) / dx = 1 - tanh(x / softcap)^2
    return probs.to(weight.dtype), chunk_loss


def reference_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | torch.Tensor | None = None,
    softcap: float | None = None,
    logit_scale: float | None = None,
    shift: bool = False,
) -> torch.Tensor:
    """The standard path :func:`linear_cross_entropy` replaces: full logits, then cross-entropy.

    The same computation as a transformers causal LM: ``lm_head``, the model's logit scaling
    and soft-capping in the model dtype, then ``ForCausalLMLoss`` (upcast to fp32,
    ``cross_entropy``, division by ``num_items_in_batch``). Same arguments as
    :func:`linear_cross_entropy`.

    Example:
        >>> import torch
        >>> h, w = torch.randn(3, 8), torch.randn(10, 8)
        >>> float(reference_linear_cross_entropy(h, w, torch.tensor([1, -100, 4]))) > 0
        True
    """
    _check_inputs(hidden, weight, target, bias, reduction, num_items_in_batch, softcap, logit_scale, shift)
    logits = F.linear(hidden, weight, bias)
    if logit_scale is not None:
        logits = logits * logit_scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if shift:
        target = _shift(target, ignore_index)
    logits = logits.float().reshape(-1, weight.shape[0])
    summed = num_items_in_batch is not None or reduction == "sum"
    loss = F.cross_entropy(
        logits, target.reshape(-1), ignore_index=ignore_index, reduction="sum" if summed else "mean"
    )
    return loss / num_items_in_batch if num_items_in_batch is not None else loss
