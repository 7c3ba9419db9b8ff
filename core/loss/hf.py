"""Route a Hugging Face causal LM's loss through :func:`~ciuic.loss.linear_cross_entropy`.

A transformers ``*ForCausalLM.forward`` runs the decoder, applies ``lm_head`` to every
position and hands the full logits to ``self.loss_function``. There is no hook between the two
that avoids the logits, so the patch is one wrapper around ``forward``, set on the instance
(the class is untouched, and a PEFT wrapper, which calls the inner model, goes through it):

- in evaluation (the module in ``eval()`` mode, or gradients disabled), and for calls without
  ``labels`` (generation), it calls the model's own forward unchanged: real logits, standard
  loss, so evaluation loops and ``compute_metrics`` work as without ciuic;
- in training with ``labels`` it calls the same forward with ``labels=None`` and an empty
  ``logits_to_keep`` (so ``lm_head`` runs on zero positions and everything the model does
  besides, e.g. MoE router outputs, stays as it is), takes the final hidden states from the
  decoder's output, and computes the loss with the chunked function. The returned output has
  the model's own class, with ``loss`` set and **``logits=None``** (the full logits are exactly
  what the chunked loss never builds), unless ``training_logits=True``: then the logits are
  computed once more, detached, without the fp32 copy, softmax or gradient buffers.

The patch is a :class:`_ChunkedForward` object (picklable, so ``copy.deepcopy``, ``pickle``
and ``torch.save`` of a patched model work) that reports the model's own signature, which
``transformers.Trainer`` reads to choose the dataset columns it passes. ``undo`` puts back
whatever ``forward`` the instance had before.

The head's weight is ``lm_head.weight`` for an ``nn.Linear`` (or the active copy of a PEFT
``modules_to_save`` wrapper). A head stored in another form (quantized, frozen) is supported
when it implements the dense-weight protocol: a method ``ciuic_dense_weight() -> (weight, bias)``
returning its weight as a dense ``(vocab_size, hidden_size)`` tensor and its bias (or None),
transient and frozen (the chunked loss sends no gradient to them). If it also implements
``ciuic_dense_rows(start, stop) -> rows`` (with ``out_features``/``in_features``), the training
loss reads it a block of rows at a time instead (:class:`~ciuic.loss.functional.FrozenRows`),
and the whole dense weight is never built.
"""

from __future__ import annotations

import inspect
import re
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ciuic.errors import ApplyError
from ciuic.registry import Applied

from .functional import DEFAULT_CHUNK_BYTES, FrozenRows, Weight, chunk_rows, linear_cross_entropy

_PATCH = "_ciuic_chunked_loss"
"""Instance attribute holding a patched model's :class:`_ChunkedForward`."""

DENSE_WEIGHT = "ciuic_dense_weight"
"""Name of the dense-weight protocol method a non-``nn.Linear`` ``lm_head`` may implement."""

DENSE_ROWS = "ciuic_dense_rows"
"""Name of the optional row-block method of that protocol."""


@dataclass(frozen=True)
class _Plan:
    """What :func:`_plan` found out about one candidate module."""

    softcap: float | None = None
    logit_scale: float | None = None
    reason: str | None = None  # why it cannot be patched


def apply_chunked_loss(
    model: nn.Module, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES, training_logits: bool = False
) -> Applied:
    """Make every Hugging Face causal LM inside ``model`` compute its training loss in chunks.

    ``ciuic.apply_(model, CiuicConfig(loss="chunked"))`` calls this. Every module with an
    ``lm_head`` child is a candidate (a PEFT model's inner ``*ForCausalLM`` included); those
    that cannot be patched are listed in ``Applied.skipped`` with the reason. Evaluation
    (``model.eval()`` or ``torch.no_grad()``) always runs the model's own forward.

    Args:
        model: A transformers causal LM, or a module (PEFT model...) containing one.
        chunk_bytes: Byte target of one chunk's logits (see :func:`ciuic.loss.chunk_rows`).
        training_logits: Also return ``logits`` from training calls with ``labels`` (for a
            trainer that computes metrics from ``outputs.logits``). They are computed without
            autograd, in the ``lm_head`` dtype, and detached: they cost one logits tensor, not
            the fp32 copy, softmax and gradient of the standard loss. Default False:
            ``logits=None`` in training.

    Returns:
        The :class:`~ciuic.registry.Applied` record; ``undo()`` restores every patched forward.

    Raises:
        ApplyError: if an argument is invalid or no module of ``model`` can be patched.

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> lm = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
        ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
        >>> applied = apply_chunked_loss(lm, chunk_bytes=2**16)
        >>> ids = torch.randint(0, 128, (2, 12))
        >>> out = lm(input_ids=ids, labels=ids)
        >>> out.logits is None, out.loss.shape
        (True, torch.Size([]))
        >>> lm.eval()(input_ids=ids, labels=ids).logits.shape
        torch.Size([2, 12, 128])
        >>> applied.undo()
    """
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < 1:
        raise ApplyError(f"chunk_bytes={chunk_bytes!r} is not allowed: give an int number of bytes >= 1.")
    if not isinstance(training_logits, bool):
        raise ApplyError(f"training_logits={training_logits!r} is not allowed: give True or False.")
    applied = Applied("loss", details={"chunk_bytes": chunk_bytes, "training_logits": training_logits})
    installed = _Installed()
    for name, module in _candidates(model):
        where = f"{name or '<root>'} ({type(module).__name__})"
        plan = _plan(module)
        if plan.reason is not None:
            applied.skipped.append((where, plan.reason))
            continue
        _install(module, _ChunkedForward(module, chunk_bytes, training_logits, plan))
        installed.modules.append(module)
        applied.changed.append(where)
    if not installed.modules:
        found = "; ".join(f"{what}: {why}" for what, why in applied.skipped) or "no submodule has an lm_head"
        raise ApplyError(
            f"loss='chunked' found no causal-LM head to patch in {type(model).__name__} ({found}). "
            f"Use loss='standard' for this model, or pass a transformers *ForCausalLM (or a PEFT model "
            f"of one)."
        )
    applied.details["chunk_tokens"] = _chunk_tokens(installed.modules[0], chunk_bytes)
    applied.undo = installed.undo
    return applied


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    # A direct child named lm_head: PEFT wrappers forward attribute lookups to the inner model,
    # so hasattr(peft_model, "lm_head") is true for them too; only the owner is a candidate.
    return [(name, module) for name, module in model.named_modules() if "lm_head" in module._modules]


def _plan(module: nn.Module) -> _Plan:
    patch = module.__dict__.get(_PATCH)
    if patch is not None and patch.active:
        return _Plan(reason="already patched by ciuic's chunked loss")
    params = _signature(type(module)).parameters
    missing = [name for name in ("labels", "logits_to_keep") if name not in params]
    if missing:
        return _Plan(
            reason=f"its forward takes no {' or '.join(missing)}: not a transformers causal LM (needs "
            f"transformers >= 4.50)"
        )
    decoder = getattr(module, "base_model", None)
    if not isinstance(decoder, nn.Module) or decoder is module:
        return _Plan(reason="it has no base_model (decoder) distinct from itself to take hidden states from")
    if "_loss_function" in module.__dict__ or getattr(module, "loss_type", None) not in (None, "ForCausalLM"):
        return _Plan(reason="it has a custom loss_function; the chunked loss reproduces ForCausalLMLoss only")
    if _head_source(_lm_head(module)) is None:
        return _Plan(
            reason=f"lm_head is a {type(_lm_head(module)).__name__} whose forward is not nn.Linear's "
            f"(LoRA on lm_head, or quantized) and which has no {DENSE_WEIGHT}() method; the chunked loss "
            f"needs a plain weight: leave lm_head out of LoRA target_modules and of quantization "
            f"(modules_to_save is supported)"
        )
    return _logit_transform(module)


def _signature(model_class: type[nn.Module]) -> inspect.Signature:
    """The class's ``forward`` signature, ``self`` first (read per call, never stored in a model)."""
    return inspect.signature(model_class.forward)


# Logit post-processing some causal LMs apply between lm_head and the loss, recognised in the
# forward's source; any other use of these names is left unpatched rather than guessed.
_MULTIPLY = re.compile(r"logits\s*=\s*logits\s*\*\s*self\.logit_scale\b")
_DIVIDE = re.compile(r"logits\s*=\s*logits\s*/\s*self\.config\.logits_scaling\b")


def _logit_transform(module: nn.Module) -> _Plan:
    try:
        source = inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        source = ""
    config = getattr(module, "config", None)
    softcap = getattr(config, "final_logit_softcapping", None)
    if "final_logit_softcapping" not in source:
        softcap = None
    scale: float | None = None
    if _MULTIPLY.search(source):
        scale = float(module.logit_scale)  # type: ignore[arg-type]
    elif _DIVIDE.search(source):
        scale = 1.0 / float(config.logits_scaling)  # type: ignore[union-attr]
    elif "logit_scale" in source or "logits_scaling" in source:
        return _Plan(reason="it rescales its logits in a way the chunked loss does not recognise")
    return _Plan(softcap=None if softcap is None else float(softcap), logit_scale=scale)


def _lm_head(module: nn.Module) -> nn.Module:
    head = module._modules["lm_head"]
    assert head is not None
    return head


def _head_source(head: nn.Module) -> nn.Module | None:
    """The module whose weight ``lm_head`` computes with now: a plain ``nn.Linear`` or a module
    with the dense-weight protocol; None if it is anything else."""
    if _has_protocol(head):
        return head
    if isinstance(head, nn.Linear) and type(head).forward is nn.Linear.forward:
        return head
    if "original_module" in head._modules and "modules_to_save" in head._modules:
        # PEFT ModulesToSaveWrapper: mirror its forward's choice of module.
        active = list(getattr(head, "active_adapters", []))
        adapters = getattr(head, "_adapters", active)
        if getattr(head, "disable_adapters", False) or not active or any(a not in adapters for a in active):
            return _head_source(head._modules["original_module"])  # type: ignore[arg-type]
        copies = head._modules["modules_to_save"]._modules  # type: ignore[union-attr]
        chosen = copies.get(active[0])
        return None if chosen is None else _head_source(chosen)
    return None


def _head_weights(source: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight, bias)`` of the head: an ``nn.Linear``'s own, or the protocol's dense copy (frozen)."""
    if not _has_protocol(source):
        return source.weight, source.bias  # type: ignore[return-value]
    with torch.no_grad():  # transient and frozen: nothing of it enters the autograd graph
        result = getattr(source, DENSE_WEIGHT)()
    ok = isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], torch.Tensor)
    ok = ok and result[0].ndim == 2 and (result[1] is None or isinstance(result[1], torch.Tensor))
    if not ok:
        raise TypeError(
            f"{type(source).__name__}.{DENSE_WEIGHT}() returned {type(result).__name__}: it must return "
            f"(weight, bias), a dense (vocab_size, hidden_size) tensor and a (vocab_size,) tensor or None."
        )
    weight, bias = result
    return weight.detach(), None if bias is None else bias.detach()


def _loss_weights(source: nn.Module) -> tuple[Weight, torch.Tensor | None]:
    """What the training loss reads the head through: its weight, or its row blocks when the
    head implements ``ciuic_dense_rows`` (no dense copy)."""
    read = getattr(source, DENSE_ROWS, None)
    if not callable(read):
        return _head_weights(source)
    stored = next(iter(source.buffers()), None)
    if stored is None:
        raise TypeError(f"{type(source).__name__} implements {DENSE_ROWS} but holds no buffer.")
    head: Any = source  # out_features/in_features: part of the protocol, not typed on nn.Module
    shape = torch.Size((int(head.out_features), int(head.in_features)))
    dtype = getattr(source, "dtype", torch.float32)
    bias = getattr(source, "bias", None)
    return FrozenRows(read, shape, dtype, stored.device), None if bias is None else bias.detach()


def _chunk_tokens(module: nn.Module, chunk_bytes: int) -> int | None:
    """Tokens per chunk for the report: from the weight's shape and dtype."""
    source = _head_source(_lm_head(module))
    if source is None:
        return None
    weight, _ = _head_weights(source)
    vocab, hidden = weight.shape
    return chunk_rows(vocab, hidden, weight.dtype, chunk_bytes=chunk_bytes)


class _ChunkedForward:
    """The patched ``forward`` of one module: the model's own, with the training loss chunked.

    A plain object (module reference, settings), so ``copy.deepcopy`` and pickling a model carry
    it along, re-pointed at the copy.
    """

    def __init__(self, module: nn.Module, chunk_bytes: int, training_logits: bool, plan: _Plan) -> None:
        self.module = module
        self.chunk_bytes = chunk_bytes
        self.training_logits = training_logits
        self.softcap = plan.softcap
        self.logit_scale = plan.logit_scale
        # An instance-level forward that was there before ours (None: the class's).
        self.previous: Callable[..., Any] | None = module.__dict__.get("forward")
        self.active = True  # False once undone while wrapped by someone else: a pass-through

    @property
    def __signature__(self) -> inspect.Signature:
        """The model's own signature, less ``self``: ``Trainer`` keeps the dataset columns it names."""
        signature = _signature(type(self.module))
        return signature.replace(parameters=list(signature.parameters.values())[1:])

    def original(self) -> Callable[..., Any]:
        """The forward that was in place before the patch."""
        if self.previous is not None:
            return self.previous
        return types.MethodType(type(self.module).forward, self.module)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        module, original = self.module, self.original()
        # Evaluation takes the model's own path: real logits for compute_metrics, standard loss.
        if not (self.active and module.training and torch.is_grad_enabled()):
            return original(*args, **kwargs)
        call = _as_keywords(_signature(type(module)), module, args, kwargs)
        if call is None or not _takes_loss(call):
            return original(*args, **kwargs)
        source = _head_source(_lm_head(module))
        if source is None:
            warnings.warn(
                f"ciuic chunked loss: lm_head of {type(module).__name__} is now a "
                f"{type(_lm_head(module)).__name__}, neither a plain nn.Linear nor a module with "
                f"{DENSE_WEIGHT}(); computing this loss the standard way (with full logits).",
                UserWarning,
                stacklevel=2,
            )
            return original(*args, **kwargs)
        return _loss_forward(self, original, call, source)


@dataclass
class _Installed:
    """The modules one ``apply_chunked_loss`` patched; its bound ``undo`` is ``Applied.undo``."""

    modules: list[nn.Module] = field(default_factory=list)

    def undo(self) -> None:
        """Put back every patched module's previous forward."""
        for module in self.modules:
            _uninstall(module)


def _install(module: nn.Module, patch: _ChunkedForward) -> None:
    module.__dict__[_PATCH] = patch
    module.__dict__["forward"] = patch


def _uninstall(module: nn.Module) -> None:
    patch = module.__dict__.get(_PATCH)
    if not isinstance(patch, _ChunkedForward):
        return
    current: object = module.__dict__.get("forward")
    if current is patch:
        if patch.previous is None:
            del module.__dict__["forward"]
        else:
            module.__dict__["forward"] = patch.previous
        del module.__dict__[_PATCH]
    else:
        patch.active = False  # wrapped again after us (e.g. accelerate hooks): become a pass-through
        warnings.warn(
            f"ciuic.remove_: the forward of {type(module).__name__} was wrapped again after ciuic "
            f"patched it; ciuic's chunked loss is now a pass-through inside that wrapper.",
            UserWarning,
            stacklevel=4,
        )


def _takes_loss(call: dict[str, Any]) -> bool:
    """A call with labels that keeps the logits of every position: the training call."""
    keep = call.get("logits_to_keep")
    keeps_all = keep is None or (isinstance(keep, int) and not isinstance(keep, bool) and keep == 0)
    return call.get("labels") is not None and keeps_all


def _as_keywords(
    signature: inspect.Signature, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> dict[str, Any] | None:
    """All arguments by name (``**kwargs`` flattened in), or None if they do not bind."""
    try:
        bound = signature.bind(module, *args, **kwargs)
    except TypeError:
        return None  # let the model's own forward raise its error
    call: dict[str, Any] = {}
    for name, value in list(bound.arguments.items())[1:]:
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            call.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                return None
        else:
            call[name] = value
    return call


class _Capture:
    """A transient forward hook keeping the decoder's output (removed before the forward returns)."""

    def __init__(self) -> None:
        self.outputs: list[Any] = []

    def __call__(self, _module: nn.Module, _args: Any, output: Any) -> None:
        self.outputs.append(output)


def _loss_forward(
    patch: _ChunkedForward, original: Callable[..., Any], call: dict[str, Any], source: nn.Module
) -> Any:
    module = patch.module
    labels = call["labels"]
    config = getattr(module, "config", None)
    return_dict = call.get("return_dict")
    as_tuple = return_dict is False or (return_dict is None and getattr(config, "return_dict", True) is False)
    weight, bias = _loss_weights(source)
    # An empty logits_to_keep: lm_head runs on zero positions, the rest of forward as usual.
    nothing = torch.empty(0, dtype=torch.long, device=weight.device)
    call = {**call, "labels": None, "logits_to_keep": nothing}
    if as_tuple:
        call["return_dict"] = True
    capture = _Capture()
    decoder: nn.Module = module.base_model  # type: ignore[assignment]
    handle = decoder.register_forward_hook(capture)
    try:
        output = original(**call)
    finally:
        handle.remove()
    if not capture.outputs or not hasattr(output, "keys"):
        raise RuntimeError(
            f"ciuic chunked loss: {type(module).__name__}.forward did not run its decoder "
            f"({type(decoder).__name__}) or returned no ModelOutput; remove loss='chunked' for this model."
        )
    hidden = _last_hidden_state(capture.outputs[-1])
    if _has_protocol(source):
        # A protocol head's dense weight comes in its storage dtype; the head computes in the input's.
        weight, bias = weight.to(hidden.dtype), None if bias is None else bias.to(hidden.dtype)
    shifted = call.get("shift_labels")
    target = labels if shifted is None else shifted
    loss = linear_cross_entropy(
        hidden,
        weight,
        target.to(hidden.device),
        bias,
        ignore_index=call.get("ignore_index", -100),
        num_items_in_batch=call.get("num_items_in_batch"),
        softcap=patch.softcap,
        logit_scale=patch.logit_scale,
        shift=shifted is None,
        chunk_bytes=patch.chunk_bytes,
    )
    aux = output.get("aux_loss")
    if aux is not None and hasattr(module, "router_aux_loss_coef"):
        loss = loss + module.router_aux_loss_coef * aux.to(loss.device)  # as MoE causal LMs do with labels
    logits = None
    if patch.training_logits:
        dense = weight.dense() if isinstance(weight, FrozenRows) else weight
        logits = _detached_logits(patch, hidden, dense, bias)
    fields = {key: value for key, value in output.items() if key not in ("loss", "logits")}
    result = type(output)(loss=loss, logits=logits, **fields)
    return result.to_tuple() if as_tuple else result


def _has_protocol(head: nn.Module) -> bool:
    return callable(getattr(type(head), DENSE_WEIGHT, None))


def _detached_logits(
    patch: _ChunkedForward, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """The logits the model's own forward returns, without autograd.

    One matmul into the result, then the model's scaling and soft-capping in place: the result
    is the only logits-sized tensor (no fp32 copy, softmax or gradient), so chunking the matmul
    would save nothing. Under autocast ``F.linear`` gives the autocast dtype, as ``lm_head`` does.
    """
    with torch.no_grad():
        logits = F.linear(hidden, weight, bias)
        if patch.logit_scale is not None:
            logits.mul_(patch.logit_scale)
        if patch.softcap is not None:
            logits.div_(patch.softcap).tanh_().mul_(patch.softcap)
    return logits


def _last_hidden_state(output: Any) -> torch.Tensor:
    hidden = getattr(output, "last_hidden_state", None)
    if hidden is None:
        hidden = output[0]
    if not isinstance(hidden, torch.Tensor):
        raise RuntimeError(
            f"ciuic chunked loss: the decoder returned {type(output).__name__} without hidden states."
        )
    return hidden
