"""Route a Hugging Face causal LM's loss through :func:`~ciuic.loss.linear_cross_entropy`.

A transformers ``*ForCausalLM.forward`` runs the decoder, applies ``lm_head`` to every
position and hands the full logits to ``self.loss_function``. There is no hook between the two
that avoids the logits, so the patch is one wrapper around ``forward``, set on the instance
(the class is untouched, and a PEFT wrapper, which calls the inner model, goes through it):

- without ``labels`` (generation, evaluation of logits) it calls the model's own forward
  unchanged;
- with ``labels`` it calls the same forward with ``labels=None`` and an empty
  ``logits_to_keep`` (so ``lm_head`` runs on zero positions and everything the model does
  besides, e.g. MoE router outputs, stays as it is), takes the final hidden states from the
  decoder's output, and computes the loss with the chunked function. The returned output has
  the model's own class, with ``loss`` set and **``logits=None``**: the full logits are exactly
  what the chunked loss never builds. Call the model without ``labels`` to get logits.

``undo`` puts back whatever ``forward`` the instance had before.
"""

from __future__ import annotations

import inspect
import re
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ciuic.errors import ApplyError
from ciuic.registry import Applied

from .functional import DEFAULT_CHUNK_BYTES, chunk_rows, linear_cross_entropy

_PATCH = "_ciuic_chunked_loss"
"""Instance attribute holding a patched model's :class:`_Patch`."""


@dataclass
class _Patch:
    chunk_bytes: int
    signature: inspect.Signature
    softcap: float | None
    logit_scale: float | None
    previous: Callable[..., Any] | None  # an instance-level forward that was there before ours
    active: bool = True


@dataclass(frozen=True)
class _Plan:
    """What :func:`_plan` found out about one candidate module."""

    softcap: float | None = None
    logit_scale: float | None = None
    reason: str | None = None  # why it cannot be patched


def apply_chunked_loss(model: nn.Module, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Applied:
    """Make every Hugging Face causal LM inside ``model`` compute its loss in chunks.

    ``ciuic.apply_(model, CiuicConfig(loss="chunked"))`` calls this; call it directly to set
    ``chunk_bytes``. Every module with an ``lm_head`` child is a candidate (a PEFT model's
    inner ``*ForCausalLM`` included); those that cannot be patched are listed in
    ``Applied.skipped`` with the reason.

    Args:
        model: A transformers causal LM, or a module (PEFT model...) containing one.
        chunk_bytes: Byte target of one chunk's logits (see :func:`ciuic.loss.chunk_rows`).

    Returns:
        The :class:`~ciuic.registry.Applied` record; ``undo()`` restores every patched forward.

    Raises:
        ApplyError: if no module of ``model`` can be patched.

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
        >>> applied.undo()
    """
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < 1:
        raise ApplyError(f"chunk_bytes={chunk_bytes!r} is not allowed: give an int number of bytes >= 1.")
    applied = Applied("loss", details={"chunk_bytes": chunk_bytes})
    patched: list[nn.Module] = []
    for name, module in _candidates(model):
        where = f"{name or '<root>'} ({type(module).__name__})"
        plan = _plan(module)
        if plan.reason is not None:
            applied.skipped.append((where, plan.reason))
            continue
        _install(module, chunk_bytes, plan)
        patched.append(module)
        applied.changed.append(where)
    if not patched:
        found = "; ".join(f"{what}: {why}" for what, why in applied.skipped) or "no submodule has an lm_head"
        raise ApplyError(
            f"loss='chunked' found no causal-LM head to patch in {type(model).__name__} ({found}). "
            f"Use loss='standard' for this model, or pass a transformers *ForCausalLM (or a PEFT model "
            f"of one)."
        )
    head = _head_linear(_lm_head(patched[0]))
    if head is not None:
        vocab, hidden = head.weight.shape
        tokens = chunk_rows(vocab, hidden, head.weight.dtype, chunk_bytes=chunk_bytes)
        applied.details["chunk_tokens"] = tokens
    applied.undo = lambda: _uninstall_all(patched)
    return applied


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    # A direct child named lm_head: PEFT wrappers forward attribute lookups to the inner model,
    # so hasattr(peft_model, "lm_head") is true for them too; only the owner is a candidate.
    return [(name, module) for name, module in model.named_modules() if "lm_head" in module._modules]


def _plan(module: nn.Module) -> _Plan:
    patch = module.__dict__.get(_PATCH)
    if patch is not None and patch.active:
        return _Plan(reason="already patched by ciuic's chunked loss")
    params = inspect.signature(type(module).forward).parameters
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
    if _head_linear(_lm_head(module)) is None:
        return _Plan(
            reason=f"lm_head is a {type(_lm_head(module)).__name__} whose forward is not nn.Linear's "
            f"(LoRA on lm_head, or quantized); the chunked loss needs a plain weight: leave lm_head out "
            f"of LoRA target_modules and of quantization (modules_to_save is supported)"
        )
    return _logit_transform(module)


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


def _head_linear(head: nn.Module) -> nn.Linear | None:
    """The ``nn.Linear`` that ``lm_head`` runs now, or None if it is anything else."""
    if isinstance(head, nn.Linear) and type(head).forward is nn.Linear.forward:
        return head
    if "original_module" in head._modules and "modules_to_save" in head._modules:
        # PEFT ModulesToSaveWrapper: mirror its forward's choice of module.
        active = list(getattr(head, "active_adapters", []))
        adapters = getattr(head, "_adapters", active)
        if getattr(head, "disable_adapters", False) or not active or any(a not in adapters for a in active):
            return _head_linear(head._modules["original_module"])  # type: ignore[arg-type]
        copies = head._modules["modules_to_save"]._modules  # type: ignore[union-attr]
        chosen = copies.get(active[0])
        return None if chosen is None else _head_linear(chosen)
    return None


def _install(module: nn.Module, chunk_bytes: int, plan: _Plan) -> None:
    previous = module.__dict__.get("forward")
    module.__dict__[_PATCH] = _Patch(
        chunk_bytes=chunk_bytes,
        signature=inspect.signature(type(module).forward),
        softcap=plan.softcap,
        logit_scale=plan.logit_scale,
        previous=previous,
    )
    # A method bound to the module: copy.deepcopy rebinds it to the copy.
    module.__dict__["forward"] = types.MethodType(_chunked_forward, module)


def _is_ours(forward: object, module: nn.Module) -> bool:
    bound_to = getattr(forward, "__self__", None)
    return getattr(forward, "__func__", None) is _chunked_forward and bound_to is module


def _uninstall_all(modules: list[nn.Module]) -> None:
    for module in modules:
        patch: _Patch = module.__dict__[_PATCH]
        if _is_ours(module.__dict__.get("forward"), module):
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
                stacklevel=3,
            )


def _original(module: nn.Module, patch: _Patch) -> Callable[..., Any]:
    if patch.previous is not None:
        return patch.previous
    return types.MethodType(type(module).forward, module)


def _chunked_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The patched ``forward``: the model's own, with the loss taken on the chunked path."""
    patch: _Patch = self.__dict__[_PATCH]
    original = _original(self, patch)
    call = _as_keywords(patch.signature, self, args, kwargs)
    if call is None or not (patch.active and _takes_loss(call)):
        return original(*args, **kwargs)
    head = _head_linear(_lm_head(self))
    if head is None:
        warnings.warn(
            f"ciuic chunked loss: lm_head of {type(self).__name__} is now a {type(_lm_head(self)).__name__}, "
            f"not a plain nn.Linear; computing this loss the standard way (with full logits).",
            UserWarning,
            stacklevel=2,
        )
        return original(*args, **kwargs)
    return _loss_forward(self, patch, original, call, head)


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


def _loss_forward(
    self: nn.Module, patch: _Patch, original: Callable[..., Any], call: dict[str, Any], head: nn.Linear
) -> Any:
    labels = call["labels"]
    config = getattr(self, "config", None)
    return_dict = call.get("return_dict")
    as_tuple = return_dict is False or (return_dict is None and getattr(config, "return_dict", True) is False)
    # An empty logits_to_keep: lm_head runs on zero positions, the rest of forward as usual.
    nothing = torch.empty(0, dtype=torch.long, device=head.weight.device)
    call = {**call, "labels": None, "logits_to_keep": nothing}
    if as_tuple:
        call["return_dict"] = True
    captured: list[Any] = []
    decoder: nn.Module = self.base_model  # type: ignore[assignment]
    handle = decoder.register_forward_hook(lambda _m, _a, out: captured.append(out))
    try:
        output = original(**call)
    finally:
        handle.remove()
    if not captured or not hasattr(output, "keys"):
        raise RuntimeError(
            f"ciuic chunked loss: {type(self).__name__}.forward did not run its decoder "
            f"({type(decoder).__name__}) or returned no ModelOutput; remove loss='chunked' for this model."
        )
    hidden = _last_hidden_state(captured[-1])
    shifted = call.get("shift_labels")
    target = labels if shifted is None else shifted
    loss = linear_cross_entropy(
        hidden,
        head.weight,
        target.to(hidden.device),
        head.bias,
        ignore_index=call.get("ignore_index", -100),
        num_items_in_batch=call.get("num_items_in_batch"),
        softcap=patch.softcap,
        logit_scale=patch.logit_scale,
        shift=shifted is None,
        chunk_bytes=patch.chunk_bytes,
    )
    aux = output.get("aux_loss")
    if aux is not None and hasattr(self, "router_aux_loss_coef"):
        loss = loss + self.router_aux_loss_coef * aux.to(loss.device)  # as MoE causal LMs do with labels
    fields = {key: value for key, value in output.items() if key not in ("loss", "logits")}
    result = type(output)(loss=loss, **fields)
    return result.to_tuple() if as_tuple else result


def _last_hidden_state(output: Any) -> torch.Tensor:
    hidden = getattr(output, "last_hidden_state", None)
    if hidden is None:
        hidden = output[0]
    if not isinstance(hidden, torch.Tensor):
        raise RuntimeError(
            f"ciuic chunked loss: the decoder returned {type(output).__name__} without hidden states."
        )
    return hidden
