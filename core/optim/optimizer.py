"""`CiuicAdamW`: a drop-in ``torch.optim.Optimizer`` with quantized states, an optional update
inside backward and optional host-resident states.

The update is :func:`ciuic.optim.functional.adamw_math` (fp32 states) or
:func:`ciuic.optim.functional.adamw_quantized` (8- or 4-bit states), applied in chunks of
:data:`CHUNK_NUMEL` elements so that the update's fp32 temporaries stay a few MiB however large
the parameter is (chunks are whole blocks, so chunking changes no bit of the result).
"""

from __future__ import annotations

import math
import threading
import warnings
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from ciuic.errors import ConfigError

from .functional import adamw_math, adamw_quantized
from .placement import Placement, Staged
from .quant import FORMATS, MIN_QUANTIZED_NUMEL, StateFormat
from .undo import UndoLog

STATE_BITS = (32, 8, 4)
"""Allowed ``state_bits``: fp32 states, or block-wise quantized 8-bit or 4-bit states."""

CHUNK_NUMEL = 1 << 20
"""Elements updated at a time (a multiple of every block size, so chunks hold whole blocks)."""

MOMENTS = ("exp_avg", "exp_avg_sq")
SAVED_SETTING = "state_bits"
"""Key of each saved param group that records ``state_bits`` (checked on load; a per-group key,
since ``torch.distributed.checkpoint`` keeps only ``state`` and ``param_groups``)."""


class CiuicAdamW(Optimizer):
    """AdamW whose states take 8 (fp32), ~2 (8-bit) or ~1 (4-bit) bytes per parameter.

    The math is ``torch.optim.AdamW``'s (decoupled weight decay, bias correction), computed in
    fp32 whatever the parameter dtype (a bf16 parameter is updated in fp32 and rounded once).

    Args:
        params: Parameters or parameter groups, as for any ``torch.optim`` optimizer.
        lr: Learning rate (a float >= 0; schedulers may change ``param_groups[i]["lr"]``).
        betas: ``(beta1, beta2)``, each in ``[0, 1)``.
        eps: Added to the denominator, >= 0.
        weight_decay: Decoupled weight decay, >= 0.
        state_bits: 32 (fp32 states), 8 (dynamic map, blocks of 256; bitsandbytes' scheme) or 4
            (blocks of 128, two codes per byte). Optimizer-wide.
        min_quantized_numel: Tensors with fewer elements keep fp32 states (biases, norms).
            Only meaningful with ``state_bits`` 8 or 4; another value with 32 is refused.
        step_in_backward: Update each parameter in its post-accumulate-grad hook and free its
            gradient there, so the gradients of the whole model never coexist. ``step()`` then
            only runs the closure. Global-norm clipping is refused (see :meth:`clip_grad_norm_`).
        accumulation_steps: With ``step_in_backward``, backward passes per update (gradient
            accumulation): parameters step in the last one. Without it, accumulate by calling
            ``step()`` every N micro-batches; a value other than 1 is refused.
        offload: Keep the states in (pinned) host memory and run the update there; on CUDA the
            copies run on a side stream, overlapping backward. Bitwise identical to ``False``.
        fp32_states: With ``state_bits=32``, keep the moments in fp32 whatever the parameter
            dtype. By default they take the parameter's dtype, as ``torch.optim.AdamW``'s do
            (bf16 parameters, bf16 moments: 4 bytes per parameter instead of 8); the update is
            computed in fp32 either way. Refused with ``state_bits`` 8 or 4 (no effect).
        recoverable: With ``step_in_backward``, keep the undo log described below, so that a
            failed backward can be undone. ``False`` saves its memory (up to a copy of the
            trainable parameters and their states, at the end of each backward); a backward
            that dies then leaves the parameters it reached stepped, with a ``RuntimeWarning``,
            and :meth:`rollback` raises. Refused without ``step_in_backward`` (no effect).

    Failure and recovery: with ``step_in_backward`` (and ``recoverable``, the default) the
    in-backward updates are transactional.
    Before a parameter steps, its value and states are copied into an undo log (host memory when
    offloading; see :mod:`ciuic.optim.undo` for the cost: up to one copy of the trainable
    parameters and their states, held from the backward until ``step()``/``zero_grad()`` or the
    next backward). If the backward dies (an exception from any hook or node), the optimizer
    restores the log as the exception unwinds, or at the latest at its next hook, ``step()``,
    ``zero_grad()`` or ``state_dict()``; :meth:`rollback` does it explicitly. A retried step
    then equals an uninterrupted one bitwise.

    Raises:
        ConfigError: an argument out of range, or one that has no effect with the others.

    Example:
        >>> import torch
        >>> from ciuic.optim import CiuicAdamW
        >>> model = torch.nn.Linear(64, 64)
        >>> opt = CiuicAdamW(model.parameters(), lr=1e-3, state_bits=8, min_quantized_numel=1)
        >>> model(torch.randn(4, 64)).sum().backward()
        >>> opt.step()
        >>> sorted(opt.state[model.weight])
        ['exp_avg_absmax', 'exp_avg_codes', 'exp_avg_sq_absmax', 'exp_avg_sq_codes', 'step']
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        state_bits: int = 32,
        min_quantized_numel: int = MIN_QUANTIZED_NUMEL,
        step_in_backward: bool = False,
        accumulation_steps: int = 1,
        offload: bool = False,
        fp32_states: bool = False,
        recoverable: bool = True,
    ) -> None:
        _check_hyper(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        _check_modes(state_bits, min_quantized_numel, step_in_backward, accumulation_steps, offload)
        _check_fp32_states(fp32_states, state_bits)
        _check_recoverable(recoverable, step_in_backward)
        self.state_bits = state_bits
        self.min_quantized_numel = min_quantized_numel
        self.step_in_backward = step_in_backward
        self.accumulation_steps = accumulation_steps
        self.fp32_states = fp32_states
        self.recoverable = recoverable
        self.placement = Placement(offload=offload)
        self._hooks: list[Any] = []
        # The hooks live on the parameters: remove them when this optimizer is collected.
        weakref.finalize(self, _remove_hooks, self._hooks)
        self._pending: list[tuple[Staged, dict[str, Any]]] = []
        self._micro_batch = 0
        self._backward: _Backward | None = None
        self._undo = UndoLog(self.placement)
        self._unlogged = 0  # updates in this backward without an undo entry (recoverable=False)
        self._lost = 0  # updates a dead backward left that rollback() must report
        self._lock = threading.RLock()  # a dying backward may be unwound on an autograd thread
        self._group_index: dict[int, int] = {}
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)

    @property
    def offload(self) -> bool:
        """Whether states live in host memory."""
        return self.placement.offload

    @property
    def _step_supports_amp_scaling(self) -> bool:
        # torch.amp.GradScaler.step hands an optimizer with this flag its scale (as the
        # ``grad_scale`` attribute) instead of unscaling the gradients, which with
        # step_in_backward are gone: step() then refuses (see _refuse_grad_scaler).
        return self.step_in_backward

    # -- torch.optim.Optimizer interface ---------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (as ``torch.optim``); with ``step_in_backward`` its parameters get hooks."""
        extra = sorted(set(param_group) - {"params", "lr", "betas", "eps", "weight_decay"})
        if extra:
            raise ConfigError(
                f"param group key {extra[0]!r} is not supported: a group may set lr, betas, eps and "
                f"weight_decay (state_bits, offload and step_in_backward are optimizer-wide)."
            )
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_hyper(**{key: group[key] for key in ("lr", "betas", "eps", "weight_decay")})
        if self.step_in_backward:
            for param in group["params"]:
                if param.requires_grad:
                    self._hooks.append(param.register_post_accumulate_grad_hook(_grad_hook(self)))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Update every parameter that has a gradient; returns ``closure()`` if given.

        With ``step_in_backward`` the updates already ran during backward: only the closure runs
        (which is where, with a closure, backward and so the updates happen), and gradients that
        did not come from a backward pass (set by hand) are applied. If the closure or an update
        raises, :meth:`rollback` runs before the exception propagates.

        Raises:
            ConfigError: with ``step_in_backward``, when an fp16 ``torch.amp.GradScaler`` calls
                it (``scaler.step(optimizer)``); the backward that just ran is rolled back.
        """
        self._recover_if_dead()
        if self.step_in_backward and getattr(self, "grad_scale", None) is not None:
            self._refuse_grad_scaler()
        try:
            loss = self._run_step(closure)
        except BaseException:
            self._recover_quietly()  # the original exception propagates
            raise
        self._make_final()
        return loss

    def _run_step(self, closure: Callable[[], Any] | None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.step_in_backward:
            if self._micro_batch == 0:  # gradients set outside backward (none after one) step now
                self._step_pending_gradients()
                self._drain(block=True)
            return loss
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._stage(param, param.grad, group)
        self._drain(block=True)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As ``torch.optim``'s; also makes the last step final (its undo log is dropped)."""
        self._recover_if_dead()
        self._make_final()
        super().zero_grad(set_to_none=set_to_none)

    def rollback(self) -> None:
        """Undo the step in progress: parameters and states return bitwise to before it.

        Call it from an ``except`` around a training step that failed (an out-of-memory error, a
        bad batch), then retry the step. It restores every parameter updated inside the current
        (or just finished, not yet ``step()``-ed) backward from the undo log, drops the
        gradients of this optimizer's parameters and restarts gradient accumulation: with
        ``accumulation_steps > 1`` the retry starts again at the window's first micro-batch
        (the gradients of the parameters already stepped were freed, so the window cannot be
        completed). Without ``step_in_backward`` parameters only change in ``step()``, so this
        only drops the gradients (an update that fails inside ``step()`` is not undone: that
        would need the log there too). Idempotent; runs by itself when a backward dies.

        Example:
            >>> import torch
            >>> from ciuic.optim import CiuicAdamW
            >>> model = torch.nn.Linear(4, 4)
            >>> opt = CiuicAdamW(model.parameters(), lr=0.1, step_in_backward=True)
            >>> before = model.weight.detach().clone()
            >>> model(torch.randn(2, 4)).sum().backward()
            >>> opt.rollback()
            >>> torch.equal(model.weight, before), len(opt.state)
            (True, 0)
        """
        lost = self._restore() + self._lost
        self._lost = 0
        if lost:
            raise ConfigError(
                f"rollback() could not undo {lost} parameter update(s) made inside the failed backward: "
                f"this CiuicAdamW was built with recoverable=False and keeps no undo log. Reload the model "
                f"and optimizer from a checkpoint, or build it with recoverable=True."
            )

    def _restore(self) -> int:
        """Undo what the log holds, drop gradients, reset counting; returns updates not undone."""
        with self._lock:
            lost = self._unlogged
            self.placement.finish()
            self._pending.clear()
            self._undo.restore(self.state)
            for group in self.param_groups:
                for param in group["params"]:
                    param.grad = None
            self._forget_step()
            return lost

    def _make_final(self) -> None:
        """The step that ran is final: drop its undo log."""
        self._undo.clear()
        self._unlogged = 0

    def _forget_step(self) -> None:
        """Make what ran final and restart counting micro-batches (a loaded state replaces it)."""
        self.placement.finish()
        self._pending.clear()
        self._make_final()
        self._micro_batch = 0
        self._backward = None

    def _recover_if_dead(self) -> None:
        """Roll back a backward that died without its end-of-backward callback running."""
        backward = self._backward
        if backward is not None and backward.dead:
            self._recover_quietly()

    def _recover_quietly(self) -> None:
        # Runs as a dead backward unwinds (or lazily): it must not raise; rollback() reports.
        lost = self._restore()
        if lost:
            self._lost += lost
            warnings.warn(
                f"a backward died after {lost} parameter(s) had stepped in it; CiuicAdamW(recoverable="
                f"False) cannot undo them (rollback() will raise).",
                RuntimeWarning,
                stacklevel=2,
            )

    def _refuse_grad_scaler(self) -> None:
        for name in ("grad_scale", "found_inf"):
            self.__dict__.pop(name, None)  # GradScaler deletes them only when step() returns
        self._recover_quietly()
        raise ConfigError(
            "step_in_backward=True cannot be used with an fp16 torch.amp.GradScaler: each parameter "
            "steps inside backward with the still-scaled gradient, before the scaler can unscale it "
            "or skip a step with inf/NaN gradients (the backward that just ran was rolled back). "
            "Train in bf16 without a scaler (Lightning precision='bf16-mixed', Hugging Face bf16=True) "
            "or set step_in_backward=False (CiuicConfig(step_in_backward=False))."
        )

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clip the gradients of this optimizer's parameters by their global norm.

        Raises:
            ConfigError: with ``step_in_backward``: each parameter is updated before the
                gradients of the others exist, so their global norm is unknown when it would be
                needed. (``torch.nn.utils.clip_grad_norm_`` would see no gradient at all and clip
                nothing.) Use ``step_in_backward=False`` to clip by global norm.
        """
        if self.step_in_backward:
            raise ConfigError(
                "global-norm gradient clipping is not available with step_in_backward=True: each "
                "parameter steps before the others' gradients exist. Set step_in_backward=False "
                "(CiuicConfig(step_in_backward=False)) to clip gradients by their global norm."
            )
        params = [p for group in self.param_groups for p in group["params"]]
        return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type=norm_type)

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim``'s state dict; each param group also records ``"state_bits"``.

        The layout is ``torch.optim``'s (``state`` keyed by parameter index, ``param_groups``),
        so ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` and
        ``set_optimizer_state_dict`` take it; :meth:`load_state_dict` checks the recorded
        ``state_bits``.
        """
        self._recover_if_dead()
        saved = super().state_dict()
        groups = [{**group, SAVED_SETTING: self.state_bits} for group in saved["param_groups"]]
        return {**saved, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by ``state_dict()``, keeping quantized codes and fp32 states exact.

        ``torch.optim.Optimizer`` casts every floating state to the parameter's dtype and device;
        here states keep their saved dtype and go where this optimizer keeps them (host memory
        when offloading), so a restored run continues bitwise identically.

        Raises:
            ConfigError: the state was saved with other ``state_bits``, ``min_quantized_numel``
                or ``fp32_states``.
        """
        self._check_saved_bits(state_dict)
        saved = state_dict["state"]
        groups = [{k: v for k, v in g.items() if k != SAVED_SETTING} for g in state_dict["param_groups"]]
        state_dict = {
            k: v for k, v in state_dict.items() if k != SAVED_SETTING
        }  # older checkpoints: top level
        with self._lock:
            self._forget_step()
            super().load_state_dict({**state_dict, "param_groups": groups})
            ids = [i for group in groups for i in group["params"]]
            params = [p for group in self.param_groups for p in group["params"]]
            for saved_id, param in zip(ids, params, strict=True):
                if saved_id in saved:
                    self.state[param] = self._placed_state(param, saved[saved_id])

    def _check_saved_bits(self, state_dict: dict[str, Any]) -> None:
        legacy = state_dict.get(SAVED_SETTING)
        for bits in {group.get(SAVED_SETTING, legacy) for group in state_dict["param_groups"]}:
            if bits != self.state_bits:
                raise ConfigError(
                    f"the optimizer state was saved with state_bits={bits!r}, this CiuicAdamW has "
                    f"state_bits={self.state_bits}: build the optimizer with state_bits={bits!r} to load it."
                )

    # -- the update ------------------------------------------------------------------------
    def _stage(self, param: torch.Tensor, grad: torch.Tensor, group: dict[str, Any]) -> None:
        if grad.is_sparse:
            raise ConfigError(
                f"CiuicAdamW got a sparse gradient for a {tuple(param.shape)} parameter: "
                f"use dense gradients (e.g. nn.Embedding(sparse=False))."
            )
        self._pending.append((self.placement.stage(param, grad), group))

    def _drain(self, *, block: bool) -> None:
        """Run the updates whose inputs have landed (all of them when ``block``)."""
        while self._pending and (block or self._pending[0][0].ready()):
            staged, group = self._pending.pop(0)
            staged.wait()
            self._update(staged, group)
            self.placement.write_back(staged)
        if block:
            self.placement.finish()

    def _update(self, staged: Staged, group: dict[str, Any]) -> None:
        param = staged.param
        state = self.state[param]
        if self.step_in_backward and self.recoverable:
            self._undo.record(param, staged.work_param, state)
        elif self.step_in_backward:
            self._unlogged += 1
        if not state:
            state.update(self._new_state(param))
        state["step"] += 1
        beta1, beta2 = group["betas"]
        hyper = {
            "step": state["step"],
            "lr": group["lr"],
            "beta1": beta1,
            "beta2": beta2,
            "eps": group["eps"],
            "weight_decay": group["weight_decay"],
        }
        with self.placement.on_host():
            flat = staged.work_param.view(-1) if staged.work_param.is_contiguous() else None
            work = staged.work_param.reshape(-1) if flat is None else flat
            grad = staged.work_grad.reshape(-1)
            bits = 32 if "exp_avg" in state else self.state_bits
            for start in range(0, work.numel(), CHUNK_NUMEL):
                span = (start, min(start + CHUNK_NUMEL, work.numel()))
                _update_chunk(work, grad, state, bits, span, hyper)
            if flat is None:
                staged.work_param.copy_(work.view_as(staged.work_param))

    def _layout(self, param: torch.Tensor) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Shape and dtype of each state tensor of ``param`` (all 1-D)."""
        numel = param.numel()
        fmt = self._formats(param)
        layout: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        if fmt is None:
            return dict.fromkeys(MOMENTS, ((numel,), self._moment_dtype(param)))
        for name, f in zip(MOMENTS, fmt, strict=True):
            layout[f"{name}_codes"] = ((f.code_bytes(numel),), torch.uint8)
            layout[f"{name}_absmax"] = ((f.blocks(numel),), torch.float32)
        return layout

    def _new_state(self, param: torch.Tensor) -> dict[str, Any]:
        tensors = {
            k: self.placement.new_state(param, shape, dtype)
            for k, (shape, dtype) in self._layout(param).items()
        }
        return {"step": 0, **tensors}

    def _moment_dtype(self, param: torch.Tensor) -> torch.dtype:
        """Unquantized moments follow the parameter dtype with ``state_bits=32``, as torch's do."""
        if self.state_bits == 32 and not self.fp32_states and param.is_floating_point():
            return param.dtype
        return torch.float32

    def _formats(self, param: torch.Tensor) -> tuple[StateFormat, StateFormat] | None:
        if self.state_bits == 32 or param.numel() < self.min_quantized_numel:
            return None
        return FORMATS[self.state_bits]

    def _placed_state(self, param: torch.Tensor, saved: dict[str, Any]) -> dict[str, Any]:
        layout = self._layout(param)
        found = {k: (tuple(v.shape), v.dtype) for k, v in saved.items() if isinstance(v, torch.Tensor)}
        if set(saved) != {"step", *layout} or found != layout:
            raise ConfigError(
                f"saved optimizer state {found} for a {tuple(param.shape)} parameter does not match this "
                f"CiuicAdamW (state_bits={self.state_bits}, min_quantized_numel={self.min_quantized_numel}, "
                f"fp32_states={self.fp32_states}), which keeps {layout}: load into an optimizer built with "
                f"the same state_bits and min_quantized_numel (and fp32_states), over the same parameters."
            )
        tensors = {key: self.placement.place_state(param, saved[key]) for key in layout}
        return {"step": int(saved["step"]), **tensors}

    # -- step in backward ------------------------------------------------------------------
    def _on_grad(self, param: torch.Tensor) -> None:
        self._start_backward()
        if self._micro_batch + 1 < self.accumulation_steps or param.grad is None:
            return  # not the last micro-batch: keep accumulating into .grad
        _tag_gradient(param.grad)
        self._stage(param, param.grad, self._group_of(param))
        param.grad = None  # the point of stepping in backward: this gradient is gone now
        self._drain(block=False)

    def _start_backward(self) -> None:
        task = torch._C._current_graph_task_id()
        if self._backward is not None and self._backward.task == task:
            return
        self._recover_if_dead()
        if self._backward is not None:  # still running: this backward runs inside it
            if self.accumulation_steps > 1:
                raise ConfigError(
                    f"a backward pass started inside another one (reentrant activation checkpointing?) with "
                    f"accumulation_steps={self.accumulation_steps}: micro-batches cannot be counted. Use "
                    f"non-reentrant checkpointing (use_reentrant=False) or accumulation_steps=1."
                )
            return
        self._make_final()  # the previous backward finished
        self._backward = _Backward(task)
        callback = _EndOfBackward(weakref.ref(self), self._backward)
        # The engine drops the callback uncalled when the backward dies: that is the signal.
        weakref.finalize(callback, _callback_dropped, weakref.ref(self), self._backward)
        torch.autograd.Variable._execution_engine.queue_callback(callback)

    def _end_backward(self) -> None:
        self._micro_batch = (self._micro_batch + 1) % self.accumulation_steps
        if self._micro_batch == 0:
            # Parameters without a gradient in the last micro-batch but with one from an earlier
            # micro-batch of this window step now, as torch would step them.
            self._step_pending_gradients()
        self._drain(block=True)
        self._backward = None

    def _step_pending_gradients(self) -> None:
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._stage(param, param.grad, group)
                    param.grad = None

    def _group_of(self, param: torch.Tensor) -> dict[str, Any]:
        # An index, not a reference to the group: load_state_dict replaces the group dicts.
        if id(param) not in self._group_index:
            self._group_index = {id(p): i for i, g in enumerate(self.param_groups) for p in g["params"]}
        return self.param_groups[self._group_index[id(param)]]


def _update_chunk(
    param: torch.Tensor,
    grad: torch.Tensor,
    state: dict[str, Any],
    bits: int,
    span: tuple[int, int],
    hyper: dict[str, Any],
) -> None:
    """Update ``param[start:stop]`` and its states in place (fp32 states when ``bits`` is 32)."""
    start, stop = span
    p, g = param[start:stop].float(), grad[start:stop].float()
    if bits == 32:
        m, v = state["exp_avg"][start:stop], state["exp_avg_sq"][start:stop]
        # fp32 math, rounded once into the moments' dtype (a no-op cast for fp32 moments)
        new_p, new_m, new_v = adamw_math(p, g, m.float(), v.float(), **hyper)
        m.copy_(new_m)
        v.copy_(new_v)
    else:
        new_p = _update_quantized(p, g, state, bits, span, hyper)
    param[start:stop].copy_(new_p)


def _update_quantized(
    p: torch.Tensor,
    g: torch.Tensor,
    state: dict[str, Any],
    bits: int,
    span: tuple[int, int],
    hyper: dict[str, Any],
) -> torch.Tensor:
    formats = FORMATS[bits]
    m, v = (_quantized_views(state, name, fmt, span) for name, fmt in zip(MOMENTS, formats, strict=True))
    new_p, new_m, new_v = adamw_quantized(
        p,
        g,
        m,
        v,
        maps=(formats[0].tables(p.device), formats[1].tables(p.device)),
        block_sizes=(formats[0].block_size, formats[1].block_size),
        bits=(formats[0].bits, formats[1].bits),
        **hyper,
    )
    for old, new in ((m, new_m), (v, new_v)):
        old[0].copy_(new[0])
        old[1].copy_(new[1])
    return new_p


def _quantized_views(
    state: dict[str, Any], name: str, fmt: StateFormat, span: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, absmax)`` of elements ``span`` (whole blocks, and an even start for nibbles)."""
    start, stop = span
    codes = state[f"{name}_codes"][fmt.code_bytes(start) : fmt.code_bytes(stop)]
    absmax = state[f"{name}_absmax"][fmt.blocks(start) : fmt.blocks(stop)]
    return codes, absmax


def _check_hyper(*, lr: Any, betas: Any, eps: Any, weight_decay: Any) -> None:
    if isinstance(lr, torch.Tensor) or not isinstance(lr, (int, float)) or not lr >= 0:
        raise ConfigError(f"lr={lr!r} is invalid: give a float >= 0 (tensor learning rates are not taken).")
    if (
        not isinstance(betas, (tuple, list))
        or len(betas) != 2
        or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas)
    ):
        raise ConfigError(f"betas={betas!r} is invalid: give two floats in [0, 1), e.g. (0.9, 0.999).")
    if not isinstance(eps, (int, float)) or not eps >= 0:
        raise ConfigError(f"eps={eps!r} is invalid: give a float >= 0, e.g. 1e-8.")
    if not isinstance(weight_decay, (int, float)) or not weight_decay >= 0 or math.isinf(weight_decay):
        raise ConfigError(f"weight_decay={weight_decay!r} is invalid: give a finite float >= 0.")


def _check_fp32_states(fp32_states: Any, state_bits: int) -> None:
    if not isinstance(fp32_states, bool):
        raise ConfigError(f"fp32_states={fp32_states!r} is invalid: give True or False.")
    if fp32_states and state_bits != 32:
        raise ConfigError(
            f"fp32_states=True has no effect with state_bits={state_bits} (moments are quantized, "
            f"small tensors' are fp32 already): set state_bits=32 or leave fp32_states=False."
        )


def _check_recoverable(recoverable: Any, step_in_backward: bool) -> None:
    if not isinstance(recoverable, bool):
        raise ConfigError(f"recoverable={recoverable!r} is invalid: give True or False.")
    if not recoverable and not step_in_backward:
        raise ConfigError(
            "recoverable=False has no effect with step_in_backward=False (parameters only change in "
            "step(), after backward, and no undo log is kept): leave recoverable=True."
        )


def _check_modes(
    state_bits: Any, min_quantized_numel: Any, step_in_backward: Any, accumulation_steps: Any, offload: Any
) -> None:
    if state_bits not in STATE_BITS or isinstance(state_bits, bool):
        raise ConfigError(f"state_bits={state_bits!r} is invalid: choose 32, 8 or 4.")
    if not _is_count(min_quantized_numel):
        raise ConfigError(f"min_quantized_numel={min_quantized_numel!r} is invalid: give an int >= 1.")
    if state_bits == 32 and min_quantized_numel != MIN_QUANTIZED_NUMEL:
        raise ConfigError(
            f"min_quantized_numel={min_quantized_numel} has no effect with state_bits=32 (nothing is "
            f"quantized): set state_bits=8 or 4, or leave min_quantized_numel at {MIN_QUANTIZED_NUMEL}."
        )
    for name, value in (("step_in_backward", step_in_backward), ("offload", offload)):
        if not isinstance(value, bool):
            raise ConfigError(f"{name}={value!r} is invalid: give True or False.")
    if not _is_count(accumulation_steps):
        raise ConfigError(f"accumulation_steps={accumulation_steps!r} is invalid: give an int >= 1.")
    if accumulation_steps != 1 and not step_in_backward:
        raise ConfigError(
            f"accumulation_steps={accumulation_steps} only applies with step_in_backward=True: without "
            f"it, accumulate by calling optimizer.step() once every {accumulation_steps} micro-batches."
        )


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _grad_hook(optimizer: CiuicAdamW) -> Callable[[torch.Tensor], None]:
    # A weak reference: the hook lives on the parameter and must not keep the optimizer alive.
    ref = weakref.ref(optimizer)

    def hook(param: torch.Tensor) -> None:
        opt = ref()
        if opt is not None:
            opt._on_grad(param)

    return hook


class _Backward:
    """One backward pass this optimizer steps in; ``dead`` once it ended without finishing."""

    __slots__ = ("dropped", "finished", "task")

    def __init__(self, task: int) -> None:
        self.task = task
        self.finished = False
        self.dropped = False

    @property
    def dead(self) -> bool:
        return self.dropped and not self.finished


class _EndOfBackward:
    """Queued on the engine at a backward's first hook; called when that backward completes."""

    def __init__(self, optimizer: weakref.ref[CiuicAdamW], backward: _Backward) -> None:
        self.optimizer = optimizer
        self.backward = backward

    def __call__(self) -> None:
        opt = self.optimizer()
        if opt is not None and opt._backward is self.backward:
            opt._end_backward()
        self.backward.finished = True


def _callback_dropped(optimizer: weakref.ref[CiuicAdamW], backward: _Backward) -> None:
    backward.dropped = True
    opt = optimizer()
    if opt is not None and opt._backward is backward and backward.dead:
        opt._recover_quietly()  # the backward died: undo its updates as the exception unwinds


def _remove_hooks(handles: list[Any]) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()


def _tag_gradient(grad: torch.Tensor) -> None:
    # The gradient is freed inside this hook, possibly before a MemoryMeter's own hook sees it.
    from ciuic.memory import tag_tensor

    tag_tensor(grad, "gradients")
