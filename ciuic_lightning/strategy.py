"""``CiuicStrategy``: Lightning's own strategies with a Ciuic config applied to the model.

One mixin, :class:`CiuicStrategyMixin`, over ``SingleDeviceStrategy`` (:class:`CiuicStrategy`),
``DDPStrategy`` (:class:`CiuicDDPStrategy`) and ``FSDPStrategy`` (:class:`CiuicFSDPStrategy`):
composition, so every ``isinstance`` check Lightning makes on strategies still holds.

The Lightning hooks it relies on, in the order the Trainer calls them (``Trainer._run`` and
``fit_loop``, Lightning 2.4-2.6):

1. ``connect(model)``; ``setup_environment()``: the device is resolved here (a single-device
   strategy otherwise stays on the CPU it was built with), then Lightning's setup runs.
2. ``LightningModule.setup`` and ``configure_model`` (the user's model exists from now on).
3. ``Strategy.setup(trainer)``: the precision plugin converts the module (``precision=`` is
   the user's), then ``model_to_device()`` (single device, DDP) or ``_setup_model()`` (FSDP):
   ``ciuic.apply_(lightning_module, config)`` runs in whichever comes first, so before the
   model moves to the device, before the DDP/FSDP wrap and before ``configure_optimizers``.
4. ``setup_optimizers(trainer)``: the user's ``configure_optimizers``; then, when the config
   names a Ciuic optimizer, each optimizer is rebuilt with ``ciuic.build_optimizer`` (groups
   and hyperparameters kept, LR schedulers re-pointed) and the Trainer settings the optimizer
   would silently defeat (``gradient_clip_val`` with ``step_in_backward``) are refused.
5. Checkpoint restore (``restore_checkpoint_after_setup`` is ``True``; Lightning otherwise
   loads the weights before ``Strategy.setup`` on one device and under DDP): weights and
   optimizer states load into the applied model and the Ciuic optimizer, so quantized weights
   and states resume exactly; ``load_checkpoint`` warns when the checkpoint's config differs.
6. Each step: ``training_step()`` enters ``handle.step_scope()`` and ``backward()`` leaves it
   after the backward pass, so the scope covers forward and backward in both the automatic
   optimization closure (where backward runs inside ``optimizer.step(closure)``) and the
   gradient-accumulation path (where the closure runs without an optimizer step). Under manual
   optimization the scope wraps the whole ``training_step`` (``manual_backward`` runs inside).
7. ``save_checkpoint``: ``checkpoint["ciuic"] = config.to_dict()``.
8. OOM recovery, when the config has a ``budget``: ``batch_to_device`` notes the batch and
   ``optimizer_step`` runs the closure through :class:`ciuic.recovery.Recovery`
   (:mod:`ciuic_lightning.recovery`); ``training_step`` gets a micro-batch in place of the batch
   at a micro-batch rung; ``teardown`` logs the escalations. Refused (``ConfigError``) with
   manual optimization and with ``accumulate_grad_batches > 1``, whose closures run outside
   ``optimizer_step``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, SingleDeviceStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info

import ciuic
from ciuic import CiuicConfig, ConfigError
from ciuic.weights.experts import QuantizedExperts, ignore_placeholders_in_ddp

from . import optimizers as _optimizers
from .recovery import RecoveringClosure

CHECKPOINT_KEY = "ciuic"
"""Key of the Ciuic config in a Lightning checkpoint."""

ConfigLike = CiuicConfig | str | Mapping[str, Any] | None


def resolve_config(config: ConfigLike, fields: Mapping[str, Any]) -> CiuicConfig:
    """``config`` (a CiuicConfig, preset name, mapping or ``None``) with ``fields`` on top.

    ``None`` values in ``fields`` mean "not given" (the form LightningCLI passes).

    Raises:
        ConfigError: a field is unknown or has a bad value (core's message, naming it).
    """
    given = {key: value for key, value in fields.items() if value is not None}
    return ciuic.as_config(config, **given)


class CiuicStrategyMixin:
    """What the three Ciuic strategies add to Lightning's; see the module docstring for when."""

    ciuic_config: CiuicConfig
    ciuic_handle: ciuic.CiuicHandle | None

    def _init_ciuic(self, config: ConfigLike, fields: Mapping[str, Any]) -> None:
        self.ciuic_config = resolve_config(config, fields)
        self.ciuic_handle = None
        self._ciuic_scope: contextlib.ExitStack | None = None
        self.ciuic_recovery: ciuic.recovery.Recovery | None = None
        """The OOM recovery of the run (with a ``budget``), built at ``setup_optimizers``."""
        self.ciuic_batch: Any = None
        self._ciuic_micro: Any = None

    # -- 3. apply ---------------------------------------------------------------------------
    def _apply_ciuic(self) -> None:
        module = self.lightning_module  # type: ignore[attr-defined]
        handle = ciuic.handle_of(module)
        if handle is None:
            handle = ciuic.apply_(module, self.ciuic_config)
        elif handle.config != self.ciuic_config:
            handle.update(self.ciuic_config)  # a second fit() with another strategy config
        self.ciuic_handle = handle

    def model_to_device(self) -> None:
        self._apply_ciuic()
        super().model_to_device()  # type: ignore[misc]

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.ciuic_handle is None or ciuic.handle_of(self.lightning_module) is None:  # type: ignore[attr-defined]
            self._apply_ciuic()
        return super()._setup_model(model)  # type: ignore[misc]

    # -- 4. optimizers ----------------------------------------------------------------------
    def setup_optimizers(self, trainer: Any) -> None:
        super().setup_optimizers(trainer)  # type: ignore[misc]
        if trainer.state.fn != TrainerFn.FITTING:
            return
        config = self.ciuic_config
        if _optimizers.names_ciuic_optimizer(config):
            self.optimizers = _optimizers.translate(  # type: ignore[attr-defined]
                self.optimizers,  # type: ignore[attr-defined]
                self.lr_scheduler_configs,  # type: ignore[attr-defined]
                config,
                trainer.accumulate_grad_batches,
            )
        for optimizer in self.optimizers:  # type: ignore[attr-defined]
            if isinstance(optimizer, ciuic.optim.CiuicAdamW):
                _check_trainer(optimizer, trainer)
        if config.budget is not None and self.ciuic_handle is not None:
            _check_recoverable(trainer)
            self.ciuic_recovery = ciuic.recovery.Recovery(self.ciuic_handle)

    # -- 8. OOM recovery --------------------------------------------------------------------
    def batch_to_device(self, batch: Any, device: Any = None, dataloader_idx: int = 0) -> Any:
        self.ciuic_batch = super().batch_to_device(batch, device, dataloader_idx)  # type: ignore[misc]
        return self.ciuic_batch

    def optimizer_step(self, optimizer: Any, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        recovery = self.ciuic_recovery
        if recovery is not None and self.lightning_module.trainer.training:  # type: ignore[attr-defined]
            closure = RecoveringClosure(closure, recovery, self, optimizer)
        try:
            return super().optimizer_step(optimizer, closure, model, **kwargs)  # type: ignore[misc]
        finally:
            if recovery is not None:
                self.ciuic_config = recovery.handle.config  # checkpoints record the config that runs

    @contextlib.contextmanager
    def ciuic_micro_batch(self, part: Any) -> Iterator[None]:
        """``training_step`` gets ``part`` in place of the batch inside this block (``None``: the batch)."""
        self._ciuic_micro = part
        try:
            yield
        finally:
            self._ciuic_micro = None

    # -- 5. checkpoints ---------------------------------------------------------------------
    @property
    def restore_checkpoint_after_setup(self) -> bool:
        # Weights must load into the applied model (quantized layers), states into the Ciuic
        # optimizer: both exist only after setup().
        return True

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        checkpoint[CHECKPOINT_KEY] = self.ciuic_config.to_dict()
        super().save_checkpoint(checkpoint, filepath, storage_options)  # type: ignore[misc]

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        # A checkpoint of an applied model holds only tensors and plain data (the codes and
        # scales of quantized weights and states, the config as a dict): weights_only loads work.
        checkpoint: dict[str, Any] = super().load_checkpoint(checkpoint_path, weights_only=weights_only)  # type: ignore[misc]
        _warn_if_other_config(checkpoint, self.ciuic_config)
        return checkpoint

    # -- 6. the step scope ------------------------------------------------------------------
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        self._leave_scope()
        if self._ciuic_micro is not None:
            args = (self._ciuic_micro, *args[1:])
        handle = self.ciuic_handle
        if handle is None:
            return super().training_step(*args, **kwargs)  # type: ignore[misc]
        batch = args[0] if args else kwargs.get("batch")
        if not self.lightning_module.automatic_optimization:  # type: ignore[attr-defined]
            with handle.step_scope(batch):
                return super().training_step(*args, **kwargs)  # type: ignore[misc]
        stack = contextlib.ExitStack()
        stack.enter_context(handle.step_scope(batch))
        try:
            output = super().training_step(*args, **kwargs)  # type: ignore[misc]
        except BaseException:
            stack.close()
            raise
        self._ciuic_scope = stack
        if _loss_of(output) is None:  # Lightning skips backward for this batch
            self._leave_scope()
        return output

    def backward(self, closure_loss: torch.Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> Any:
        # A backward that dies rolls a step-in-backward update back by itself (CiuicAdamW).
        try:
            return super().backward(closure_loss, optimizer, *args, **kwargs)  # type: ignore[misc]
        finally:
            self._leave_scope()

    def _leave_scope(self) -> None:
        stack, self._ciuic_scope = self._ciuic_scope, None
        if stack is not None:
            stack.close()

    def teardown(self) -> None:
        self._leave_scope()
        if self.ciuic_recovery is not None and self.ciuic_recovery.escalations:
            rank_zero_info(self.ciuic_recovery.report())
        super().teardown()  # type: ignore[misc]


def _loss_of(output: Any) -> Any:
    if isinstance(output, Mapping):
        return output.get("loss")
    return output


def _check_trainer(optimizer: torch.optim.Optimizer, trainer: Any) -> None:
    """Refuse, before the first step, Trainer settings the optimizer would silently defeat."""
    clip = trainer.gradient_clip_val
    ciuic.optim.check_trainer_settings(
        optimizer,
        clip_grad_norm=clip if clip else None,
        grad_scaler=getattr(trainer.precision_plugin, "scaler", None) is not None,
        accumulation_steps=trainer.accumulate_grad_batches,
    )


def _check_recoverable(trainer: Any) -> None:
    """Refuse the Trainer settings under which a step's closure runs outside ``optimizer_step``."""
    if not trainer.lightning_module.automatic_optimization:
        raise ConfigError(
            "budget= turns on OOM recovery, which retries Lightning's automatic-optimization closure: "
            "with automatic_optimization=False it cannot see the step. Use automatic optimization, "
            "or budget=None."
        )
    if trainer.world_size > 1:
        raise ConfigError(
            f"budget= turns on OOM recovery, which escalates each process on its own: with "
            f"world_size={trainer.world_size} the processes would train under different configs (and "
            f"wait on each other's gradients). Run on one device, or budget=None."
        )
    if trainer.accumulate_grad_batches != 1:
        raise ConfigError(
            f"budget= turns on OOM recovery, which cannot retry the batches that "
            f"accumulate_grad_batches={trainer.accumulate_grad_batches} runs without an optimizer step: "
            f"use accumulate_grad_batches=1 (recovery splits a batch into micro-batches itself when it "
            f"must), or budget=None."
        )


def _warn_if_other_config(checkpoint: Mapping[str, Any], config: CiuicConfig) -> None:
    saved = checkpoint.get(CHECKPOINT_KEY)
    if saved is None:
        return
    saved_config = CiuicConfig.from_dict(saved)
    differ = saved_config.differs(config)
    if differ:
        warnings.warn(
            f"this checkpoint was saved under another Ciuic config ({', '.join(differ)} differ: saved "
            f"{saved_config!r}); the run resumes with the strategy's {config!r}. To resume exactly, "
            f"pass CiuicStrategy(CiuicConfig.from_dict(checkpoint['ciuic'])).",
            UserWarning,
            stacklevel=2,
        )


# -- the three strategies --------------------------------------------------------------------
# The config fields are spelled out (not **kwargs) because LightningCLI/jsonargparse builds
# `--trainer.strategy.init_args.<field>` from the typed signature;
# tests/lightning/test_strategy.py checks they match ``ciuic.config.fields()``.

OptionField = str | dict[str, Any] | None


class CiuicStrategy(CiuicStrategyMixin, SingleDeviceStrategy):
    """Lightning's single-device strategy with a Ciuic config applied to the model.

    Args:
        config: A :class:`ciuic.CiuicConfig`, a preset name (``"balanced"``...), or a dict.
        weights, activations, offload, checkpointing, optimizer, step_in_backward, loss, budget:
            Config fields (see ``ciuic --help``) replacing those of ``config``; ``None`` keeps
            them.
        device: The device; default the Trainer's (``accelerator``/``devices``).
        **fields: Config fields added by techniques after this version.

    Example:
        >>> import lightning.pytorch as pl
        >>> from ciuic_lightning import CiuicStrategy
        >>> trainer = pl.Trainer(strategy=CiuicStrategy("balanced"), accelerator="cpu",
        ...                      logger=False, enable_checkpointing=False)
    """

    strategy_name = "ciuic"

    def __init__(
        self,
        config: CiuicConfig | str | dict[str, Any] | None = None,
        *,
        weights: OptionField = None,
        activations: OptionField = None,
        offload: list[str] | None = None,
        checkpointing: str | int | None = None,
        optimizer: str | None = None,
        step_in_backward: bool | None = None,
        loss: OptionField = None,
        budget: str | int | None = None,
        device: str | torch.device | None = None,
        accelerator: Any = None,
        checkpoint_io: Any = None,
        precision_plugin: Any = None,
        **fields: Any,
    ) -> None:
        super().__init__(
            device=device or "cpu",
            accelerator=accelerator,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
        )
        self._device_given = device is not None
        named = dict(
            weights=weights,
            activations=activations,
            offload=offload,
            checkpointing=checkpointing,
            optimizer=optimizer,
            step_in_backward=step_in_backward,
            loss=loss,
            budget=budget,
        )
        self._init_ciuic(config, {**named, **fields})

    def setup_environment(self) -> None:
        if not self._device_given:
            self._root_device = _trainer_device(self)
        super().setup_environment()

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(cls.strategy_name, cls, description="Ciuic config on one device")


class CiuicDDPStrategy(CiuicStrategyMixin, DDPStrategy):
    """Lightning's ``DDPStrategy`` with a Ciuic config applied on every rank.

    Args:
        config, weights, activations, offload, checkpointing, optimizer, step_in_backward,
            loss, budget: As :class:`CiuicStrategy`.
        **kwargs: ``DDPStrategy``'s arguments (``start_method``, ``find_unused_parameters``...).
    """

    strategy_name = "ciuic_ddp"

    def __init__(
        self,
        config: CiuicConfig | str | dict[str, Any] | None = None,
        *,
        weights: OptionField = None,
        activations: OptionField = None,
        offload: list[str] | None = None,
        checkpointing: str | int | None = None,
        optimizer: str | None = None,
        step_in_backward: bool | None = None,
        loss: OptionField = None,
        budget: str | int | None = None,
        **kwargs: Any,
    ) -> None:
        names = _field_names()
        fields = {key: kwargs.pop(key) for key in list(kwargs) if key in names}
        super().__init__(**kwargs)
        named = dict(
            weights=weights,
            activations=activations,
            offload=offload,
            checkpointing=checkpointing,
            optimizer=optimizer,
            step_in_backward=step_in_backward,
            loss=loss,
            budget=budget,
        )
        self._init_ciuic(config, {**named, **fields})

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        if ciuic.handle_of(self.lightning_module) is None:
            self._apply_ciuic()
        ignore_placeholders_in_ddp(model)  # named from Lightning's wrapper, which DDP wraps
        return super()._setup_model(model)

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(cls.strategy_name, cls, description="Ciuic config under DDP")
        strategy_registry.register(
            "ciuic_ddp_spawn", cls, description="Ciuic config under DDP (spawn)", start_method="spawn"
        )


class CiuicFSDPStrategy(CiuicStrategyMixin, FSDPStrategy):
    """Lightning's ``FSDPStrategy`` with a Ciuic config applied on every rank, before the wrap.

    ``use_orig_params`` defaults to ``True`` (LoRA mixes frozen and trainable parameters in one
    FSDP unit), and modules whose parameters are not floating point (the quantized weights of
    ``weights=``) are left unsharded (``ignored_states``): each rank keeps its copy.

    Args:
        config, weights, activations, offload, checkpointing, optimizer, step_in_backward,
            loss, budget: As :class:`CiuicStrategy`.
        **kwargs: ``FSDPStrategy``'s arguments.
    """

    strategy_name = "ciuic_fsdp"
    _registered_strategies: ClassVar[list[str]] = []  # not FSDPStrategy's: Lightning refuses those on CPU

    def __init__(
        self,
        config: CiuicConfig | str | dict[str, Any] | None = None,
        *,
        weights: OptionField = None,
        activations: OptionField = None,
        offload: list[str] | None = None,
        checkpointing: str | int | None = None,
        optimizer: str | None = None,
        step_in_backward: bool | None = None,
        loss: OptionField = None,
        budget: str | int | None = None,
        **kwargs: Any,
    ) -> None:
        names = _field_names()
        fields = {key: kwargs.pop(key) for key in list(kwargs) if key in names}
        kwargs.setdefault("use_orig_params", True)
        super().__init__(**kwargs)
        named = dict(
            weights=weights,
            activations=activations,
            offload=offload,
            checkpointing=checkpointing,
            optimizer=optimizer,
            step_in_backward=step_in_backward,
            loss=loss,
            budget=budget,
        )
        self._init_ciuic(config, {**named, **fields})

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        if ciuic.handle_of(self.lightning_module) is None:
            self._apply_ciuic()
        ignored = _not_shardable(model)
        if ignored:
            self.kwargs["ignored_states"] = [*self.kwargs.get("ignored_states", ()), *ignored]
        if self.root_device.type == "cpu":
            return self._wrap_on_cpu(model)
        return super()._setup_model(model)

    def _wrap_on_cpu(self, model: torch.nn.Module) -> torch.nn.Module:
        """Lightning's FSDP wrap with ``device_id=cpu``: Lightning passes ``root_device.index``
        (``None`` on CPU), which FSDP refuses; the CPU/gloo runs of the tests need this."""
        from lightning.pytorch.strategies.fsdp import _setup_activation_checkpointing
        from torch.distributed.fsdp import FullyShardedDataParallel

        if any(isinstance(module, FullyShardedDataParallel) for module in model.modules()):
            return model
        wrapped = FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=self.root_device,
            **self.kwargs,
        )
        _setup_activation_checkpointing(wrapped, self._activation_checkpointing_kwargs)
        return wrapped

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(cls.strategy_name, cls, description="Ciuic config under FSDP")
        cls._registered_strategies.append(cls.strategy_name)


def _not_shardable(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Modules holding non-floating-point parameters (quantized weights) or the data-less
    placeholders of quantized experts: FSDP flattens only floating-point parameters of one
    dtype that own their storage."""
    found = []
    for module in model.modules():
        direct = list(module.parameters(recurse=False))
        if isinstance(module, QuantizedExperts) or any(not p.is_floating_point() for p in direct):
            found.append(module)
    return found


def _field_names() -> set[str]:
    return {spec.name for spec in ciuic.config.fields()}


def _trainer_device(strategy: SingleDeviceStrategy) -> torch.device:
    """The device the Trainer's ``accelerator``/``devices`` chose (Lightning builds a
    ``SingleDeviceStrategy`` with it itself, but leaves a strategy instance on its CPU default)."""
    trainer = strategy.lightning_module.trainer if strategy.lightning_module is not None else None
    devices = list(getattr(getattr(trainer, "_accelerator_connector", None), "_parallel_devices", []) or [])
    if len(devices) > 1:
        raise ConfigError(
            f"CiuicStrategy runs on one device, but the Trainer has devices={len(devices)}: use "
            f"strategy='ciuic_ddp' (or CiuicDDPStrategy(...)) for several devices, or devices=1."
        )
    if devices:
        device = devices[0]
        return device if isinstance(device, torch.device) else torch.device("cuda", int(device))
    return strategy.root_device


def register(registry: Any = StrategyRegistry) -> None:
    """Register ``"ciuic"``, ``"ciuic_ddp"``, ``"ciuic_ddp_spawn"`` and ``"ciuic_fsdp"``."""
    for cls in (CiuicStrategy, CiuicDDPStrategy, CiuicFSDPStrategy):
        if cls.strategy_name not in registry:
            cls.register_strategies(registry)
