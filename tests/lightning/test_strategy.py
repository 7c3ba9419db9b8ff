"""CiuicStrategy on a real Lightning Trainer (CPU): the tiny DeepSeek-V3 with PEFT LoRA whose
``training_step`` calls ``self.model(...)``, as a user writes it."""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import pytest
import torch

import ciuic
from ciuic import ConfigError
from ciuic_lightning import CiuicCallback, CiuicDDPStrategy, CiuicFSDPStrategy, CiuicStrategy
from tests.lightning.helpers import LoraModule, loader, trainer

STEADY = 2
"""A metered step after the first (which creates the optimizer states): the steady state."""


def _fit(tmp_path: Path, strategy: object, steps: int, **kwargs: object) -> tuple[LoraModule, CiuicCallback]:
    torch.manual_seed(0)
    module = LoraModule()
    meter = CiuicCallback(every_n_steps=10_000, warmup=STEADY + 1, print_table=False)
    run = trainer(tmp_path, strategy=strategy, max_steps=steps, callbacks=[meter], **kwargs)
    run.fit(module, loader(4 * steps))
    return module, meter


def _core_loop(preset: str) -> dict[str, int]:
    """The same job without Lightning: apply_, build_optimizer, step_scope; steady-step reading."""
    module = LoraModule()
    config = ciuic.CiuicConfig.preset(preset)
    handle = ciuic.apply_(module, config)
    trainable = [p for p in module.parameters() if p.requires_grad]
    optimizer = ciuic.build_optimizer(trainable, config, lr=module.lr, weight_decay=0.0)
    batches = list(loader(4 * (STEADY + 1)))
    assert len(batches) == STEADY + 1
    for (tokens,) in batches:  # the reading kept is the last one, of step STEADY
        with ciuic.MemoryMeter(device="cpu", track=(module, optimizer)) as meter:
            with handle.step_scope():
                module.model(input_ids=tokens, labels=tokens).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return meter.peak_by_category


def test_balanced_matches_plain_loss_with_the_core_memory_factors(tmp_path: Path) -> None:
    plain, plain_meter = _fit(tmp_path, "auto", 50)
    ours, ours_meter = _fit(tmp_path, CiuicStrategy("balanced"), 50)
    assert len(plain.losses) == len(ours.losses) == 50
    gap = abs(ours.losses[-1] - plain.losses[-1]) / plain.losses[-1]
    assert gap < 0.03, (plain.losses[-1], ours.losses[-1])
    assert ours.losses[-1] < math.log(64) - 0.3  # and it learned

    before = plain_meter.readings[STEADY].peak_by_category
    after = ours_meter.readings[STEADY].peak_by_category
    print("plain", before, "\nbalanced", after)
    # What the adapter applied is what core gives: the same bytes as core's own loop. (Not the
    # gradients: Lightning zeroes them after the next forward, inside its closure, so the
    # previous step's LoRA gradients are alive at the peak under any strategy.)
    core = _core_loop("balanced")
    for category in ("parameters", "optimizer", "activations"):
        assert after[category] == core[category], category
    # The factors of the balanced preset on this model (batch 4 x 32 tokens, fp32, LoRA r=8), as
    # measured: parameters 400,560 -> 236,144 B (0.59x: NF4 frozen weights; LoRA, lm_head and
    # the PEFT-adapted experts stay dense), optimizer 148,576 -> 99,584 B (0.67x: 8-bit states,
    # small tensors keep fp32 ones), saved activations 1,263,632 -> 333,968 B (3.8x smaller:
    # int8), peak 2,062,368 -> 1,266,448 B (1.63x smaller).
    assert after["parameters"] / before["parameters"] < 0.60
    assert after["optimizer"] / before["optimizer"] < 0.70
    assert after["activations"] / before["activations"] < 1 / 3.5
    ratio = ours_meter.readings[STEADY].peak_bytes / plain_meter.readings[STEADY].peak_bytes
    assert ratio < 1 / 1.6, ratio


def test_strategy_by_name_applies_the_default_config(tmp_path: Path) -> None:
    module = LoraModule()
    run = trainer(tmp_path, strategy="ciuic", max_steps=2)
    assert isinstance(run.strategy, CiuicStrategy)
    run.fit(module, loader(8))
    handle = ciuic.handle_of(module)
    assert handle is not None and handle.config == ciuic.CiuicConfig()
    assert len(module.losses) == 2


def test_fields_are_the_core_config_fields() -> None:
    fields = {spec.name for spec in ciuic.config.fields()}
    for cls in (CiuicStrategy, CiuicDDPStrategy, CiuicFSDPStrategy):
        keyword_only = {
            name
            for name, p in inspect.signature(cls.__init__).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        }
        assert fields <= keyword_only, (cls.__name__, fields - keyword_only)


def test_config_forms() -> None:
    assert CiuicStrategy("max").ciuic_config == ciuic.CiuicConfig.preset("max")
    assert CiuicStrategy("balanced", activations="int4").ciuic_config == ciuic.CiuicConfig.preset(
        "balanced", activations="int4"
    )
    assert CiuicStrategy(weights="nf4").ciuic_config == ciuic.CiuicConfig(weights="nf4")
    config = ciuic.CiuicConfig(optimizer="adamw8bit")
    assert CiuicStrategy(config).ciuic_config is config
    assert CiuicStrategy({"preset": "balanced", "loss": "standard"}).ciuic_config.loss == "standard"
    assert CiuicDDPStrategy("balanced", find_unused_parameters=True).ciuic_config.weights == "nf4"


def test_bad_value_is_core_error_before_any_step() -> None:
    with pytest.raises(ConfigError, match="weights='nf5'"):
        CiuicStrategy(weights="nf5")
    with pytest.raises(ConfigError, match="preset='fast'"):
        CiuicStrategy("fast")


def test_user_optimizer_is_replaced_with_its_groups_and_schedule(tmp_path: Path) -> None:
    module = LoraModule(schedule=True)
    run = trainer(tmp_path, strategy=CiuicStrategy(optimizer="adamw8bit"), max_steps=3)
    run.fit(module, loader(12))
    (optimizer,) = run.optimizers
    assert isinstance(optimizer, ciuic.optim.CiuicAdamW) and optimizer.state_bits == 8
    (group,) = optimizer.param_groups
    assert (group["betas"], group["eps"], group["weight_decay"]) == ((0.9, 0.999), 1e-8, 0.0)
    assert group["initial_lr"] == module.lr
    assert group["lr"] == pytest.approx(module.lr / (1 + 0.05 * 3))  # the schedule ran on it
    (scheduler,) = run.lr_scheduler_configs
    assert scheduler.scheduler.optimizer is optimizer
    assert all(p.requires_grad for p in group["params"])


def test_untranslatable_optimizer_is_kept_with_the_reason(tmp_path: Path) -> None:
    class SGDModule(LoraModule):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)

    module = SGDModule()
    run = trainer(tmp_path, strategy=CiuicStrategy(optimizer="adamw8bit"), max_steps=1)
    with pytest.warns(UserWarning, match="kept your SGD: SGD is not torch.optim.AdamW or Adam"):
        run.fit(module, loader(4))
    assert isinstance(run.optimizers[0], torch.optim.SGD)


def test_gradient_clipping_with_step_in_backward_is_refused_before_training(tmp_path: Path) -> None:
    module = LoraModule()
    run = trainer(tmp_path, strategy=CiuicStrategy(step_in_backward=True), max_steps=2, gradient_clip_val=1.0)
    with pytest.raises(ConfigError, match=r"clip_grad_norm=1\.0"):
        run.fit(module, loader(8))
    assert module.losses == []


def test_accumulation_reaches_step_in_backward(tmp_path: Path) -> None:
    """accumulate_grad_batches=2 with step_in_backward steps like the plain accumulated run."""
    finals = []
    for step_in_backward in (False, True):
        torch.manual_seed(0)
        module = LoraModule()
        strategy = CiuicStrategy(optimizer="adamw8bit", step_in_backward=step_in_backward)
        run = trainer(tmp_path, strategy=strategy, max_steps=2, accumulate_grad_batches=2)
        run.fit(module, loader(16))
        assert run.global_step == 2 and len(module.losses) == 4
        if step_in_backward:
            assert run.optimizers[0].accumulation_steps == 2
        finals.append({n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad})
    different = [n for n in finals[0] if not torch.equal(finals[0][n], finals[1][n])]
    assert not different, different[:3]


def test_manual_optimization_runs_in_the_scope(tmp_path: Path) -> None:
    class Manual(LoraModule):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch: object, batch_idx: int) -> torch.Tensor:
            optimizer = self.optimizers()
            (tokens,) = batch  # type: ignore[misc]
            loss = self.model(input_ids=tokens, labels=tokens).loss
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()
            self.losses.append(loss.item())
            return loss

    module = Manual()  # a backward outside the scope would raise InertTechniqueError
    run = trainer(tmp_path, strategy=CiuicStrategy("balanced"), max_steps=2)
    run.fit(module, loader(8))
    assert len(module.losses) == 2 and isinstance(run.optimizers[0], ciuic.optim.CiuicAdamW)


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_the_users_precision_stays_theirs(tmp_path: Path, precision: str) -> None:
    module = LoraModule()
    run = trainer(tmp_path, strategy=CiuicStrategy("balanced"), max_steps=2, precision=precision)
    run.fit(module, loader(8, batch_size=2, seq_len=16))
    assert run.precision == precision and len(module.losses) == 2
    lora_dtypes = {p.dtype for n, p in module.named_parameters() if "lora_" in n}
    assert lora_dtypes == {torch.bfloat16 if precision == "bf16-true" else torch.float32}
    assert ciuic.handle_of(module).record("weights") is not None


def test_several_devices_are_sent_to_ciuic_ddp(tmp_path: Path) -> None:
    run = trainer(tmp_path, strategy=CiuicStrategy("balanced"), devices=2, max_steps=1)
    module = LoraModule()
    with pytest.raises(ConfigError, match="strategy='ciuic_ddp'"):
        run.fit(module, loader(4))
    assert module.losses == []


def test_a_second_fit_with_another_config_updates_the_model(tmp_path: Path) -> None:
    module = LoraModule()
    trainer(tmp_path, strategy=CiuicStrategy("balanced"), max_steps=1).fit(module, loader(4))
    handle = ciuic.handle_of(module)
    trainer(tmp_path, strategy=CiuicStrategy("balanced", activations="int4"), max_steps=1).fit(
        module, loader(4)
    )
    assert ciuic.handle_of(module) is handle
    assert handle.config == ciuic.CiuicConfig.preset("balanced", activations="int4")
    assert handle.record("activations").details["codec"] == "int4"
