"""The AdamW update as pure functions of tensors (no optimizer object, no side effects).

``adamw_math`` is Loshchilov & Hutter's decoupled-weight-decay Adam (https://arxiv.org/abs/1711.05101)
in the form ``torch.optim.AdamW`` computes it; ``adamw_quantized`` wraps it with block-wise
dequantization and requantization of the two moments. Both take 1-D fp32 tensors and return new
tensors, and both trace with ``torch.compile(fullgraph=True)``.

Each step is a separate multiply, add, divide or square root (no fused ``addcdiv``/``lerp``, and
no division by a Python scalar, which CUDA computes as a multiplication by its reciprocal): every
operation is then one IEEE-754 rounding, so CPU and CUDA should give the same bits, which is what
lets the host-offloaded optimizer equal the on-device one exactly on a GPU machine (checked by a
CUDA-gated test; on CPU both paths run the same code).
"""

from __future__ import annotations

import math

import torch

from .quant import dequantize_blockwise, quantize_blockwise


def adamw_math(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One AdamW step on fp32 tensors; returns ``(param, exp_avg, exp_avg_sq)``, all new.

    Args:
        param: Parameter values (fp32).
        grad: Its gradient (fp32), already scaled if clipping applies.
        exp_avg: First moment before the step.
        exp_avg_sq: Second moment before the step.
        step: The step number, 1 for the first step (bias correction).
        lr: Learning rate.
        beta1: First-moment decay.
        beta2: Second-moment decay.
        eps: Added to the denominator.
        weight_decay: Decoupled weight decay (multiplies the parameter by ``1 - lr * weight_decay``).

    Example:
        >>> p, m, v = adamw_math(torch.ones(2), torch.ones(2), torch.zeros(2), torch.zeros(2), step=1,
        ...                      lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
        >>> [round(x, 4) for x in p.tolist()]
        [0.9, 0.9]
    """
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = math.sqrt(1 - beta2**step)
    exp_avg = exp_avg * beta1 + grad * (1 - beta1)
    exp_avg_sq = exp_avg_sq * beta2 + grad * grad * (1 - beta2)
    # A product with the scalar's reciprocal, not a quotient: CUDA turns a division by a scalar
    # into exactly that product (ATen's div_true kernel), the CPU does not; this way both agree.
    denom = exp_avg_sq.sqrt() * (1 / bias_correction2_sqrt) + eps
    if weight_decay != 0:
        param = param * (1 - lr * weight_decay)
    param = param - exp_avg / denom * (lr / bias_correction1)
    return param, exp_avg, exp_avg_sq


def adamw_quantized(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: tuple[torch.Tensor, torch.Tensor],
    exp_avg_sq: tuple[torch.Tensor, torch.Tensor],
    *,
    maps: tuple[
        tuple[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    ],
    block_sizes: tuple[int, int],
    bits: tuple[int, int],
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """One AdamW step with block-wise quantized moments.

    Args:
        param: Parameter values (fp32, 1-D).
        grad: Its gradient (fp32, 1-D).
        exp_avg: ``(codes, absmax)`` of the first moment.
        exp_avg_sq: ``(codes, absmax)`` of the second moment.
        maps: ``(map, midpoints, lookup)`` of each moment (``StateFormat.tables``).
        block_sizes: Block size of each moment.
        bits: Bits per code of each moment (8 or 4).
        step, lr, beta1, beta2, eps, weight_decay: As in :func:`adamw_math`.

    Returns:
        ``(param, (codes, absmax), (codes, absmax))``: the new parameter and requantized moments.

    Example:
        >>> from ciuic.optim.quant import FORMATS
        >>> fm, fv = FORMATS[8]
        >>> cpu = torch.device("cpu")
        >>> zeros = (torch.zeros(5, dtype=torch.uint8), torch.zeros(1))
        >>> p, m, v = adamw_quantized(torch.ones(5), torch.ones(5), zeros, zeros,
        ...     maps=(fm.tables(cpu), fv.tables(cpu)), block_sizes=(256, 256), bits=(8, 8), step=1,
        ...     lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
        >>> [round(x, 4) for x in p.tolist()]
        [0.9, 0.9, 0.9, 0.9, 0.9]
    """
    numel = param.numel()
    (m_map, m_mid, m_lookup), (v_map, v_mid, v_lookup) = maps
    m = dequantize_blockwise(*exp_avg, m_map, block_size=block_sizes[0], bits=bits[0], numel=numel)
    v = dequantize_blockwise(*exp_avg_sq, v_map, block_size=block_sizes[1], bits=bits[1], numel=numel)
    param, m, v = adamw_math(
        param, grad, m, v, step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay
    )
    m_q = quantize_blockwise(m, m_mid, block_size=block_sizes[0], bits=bits[0], lookup=m_lookup)
    v_q = quantize_blockwise(v, v_mid, block_size=block_sizes[1], bits=bits[1], lookup=v_lookup)
    return param, m_q, v_q
