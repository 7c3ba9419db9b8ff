"""``CiuicCallback`` with the real ``Trainer``: the optimizer routes, the refusals before the first
step, gradient accumulation with ``num_items_in_batch``, bf16, a bitsandbytes-loaded model, the
memory in the logs. Few steps each: these check behavior, the acceptance tests check length."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

import ciuic
from ciuic.errors import ApplyError, ConfigError, InertTechniqueError
from ciuic.optim import CiuicAdamW
from ciuic_hf import PEAK_KEY, CiuicCallback, CiuicOptimizer, category_key, optimizer_cls_and_kwargs
from ciuic_hf.checks import checkpointing_field
from tests.hf.common import Progressions, arguments, build, losses
from tests.models import deepseek_v3, lora

CHECKPOINTING = "<activation or gradient checkpointing>"

# -- the optimizer the Trainer builds ---------------------------------------------------------------


def _built(trainer: Trainer) -> torch.optim.Optimizer:
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    return trainer.optimizer


def test_callback_alone_makes_the_trainer_build_the_config_optimizer(tmp_path: Path) -> None:
    trainer = build(
        tmp_path,
        [CiuicCallback("balanced")],
        learning_rate=3e-3,
        weight_decay=0.05,
        adam_beta1=0.8,
        adam_beta2=0.95,
        adam_epsilon=1e-6,
        lr_scheduler_type="constant",
    )
    optimizer = _built(trainer)
    assert isinstance(optimizer, CiuicAdamW) and optimizer.state_bits == 8 and not optimizer.step_in_backward
    decays = sorted({group["weight_decay"] for group in optimizer.param_groups})
    assert decays == [0.0, 0.05] or decays == [0.05]  # the Trainer's own decay grouping
    for group in optimizer.param_groups:
        assert (group["lr"], group["betas"], group["eps"]) == (3e-3, (0.8, 0.95), 1e-6)
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in trainer.model.parameters() if p.requires_grad}
    assert trainer.lr_scheduler.get_last_lr() == [3e-3] * len(optimizer.param_groups)


def test_step_in_backward_gets_the_accumulation_steps(tmp_path: Path) -> None:
    trainer = build(tmp_path, [CiuicCallback("max")], max_grad_norm=0.0, gradient_accumulation_steps=3)
    optimizer = _built(trainer)
    assert isinstance(optimizer, CiuicAdamW)
    assert (optimizer.state_bits, optimizer.step_in_backward, optimizer.offload) == (4, True, True)
    assert optimizer.accumulation_steps == 3


def test_optimizer_cls_and_kwargs_route(tmp_path: Path) -> None:
    args = arguments(tmp_path, learning_rate=2e-3)
    route = optimizer_cls_and_kwargs("balanced", args)
    assert route[0] is CiuicOptimizer
    trainer = build(
        tmp_path,
        [CiuicCallback("balanced")],
        learning_rate=2e-3,
        trainer_kwargs={"optimizer_cls_and_kwargs": route},
    )
    optimizer = _built(trainer)
    assert isinstance(optimizer, CiuicAdamW) and optimizer.param_groups[0]["lr"] == 2e-3
    trainer.callback_handler.optimizer = optimizer
    trainer.callback_handler.on_train_begin(trainer.args, trainer.state, trainer.control)  # passes the check


def test_other_optimizer_route_is_refused(tmp_path: Path) -> None:
    route = (torch.optim.SGD, {"lr": 0.1})
    with pytest.raises(
        ConfigError, match=r"optimizer_cls_and_kwargs=\(SGD, \.\.\.\)\) builds another optimizer"
    ):
        build(tmp_path, [CiuicCallback("balanced")], trainer_kwargs={"optimizer_cls_and_kwargs": route})
    other = optimizer_cls_and_kwargs("max", arguments(tmp_path))
    with pytest.raises(ConfigError, match="got another config than CiuicCallback"):
        build(tmp_path, [CiuicCallback("balanced")], trainer_kwargs={"optimizer_cls_and_kwargs": other})


def test_prebuilt_optimizer_is_kept(tmp_path: Path) -> None:
    """``Trainer(optimizers=(CiuicAdamW(...), None))``: apply first, build, and CiuicCallback()."""
    model = lora(deepseek_v3())
    config = ciuic.CiuicConfig.preset("balanced")
    ciuic.apply_(model, config)
    optimizer = ciuic.build_optimizer([p for p in model.parameters() if p.requires_grad], config, lr=1e-2)
    trainer = Trainer(
        model=model,
        args=arguments(tmp_path, max_steps=2),
        train_dataset=Progressions(8),
        callbacks=[CiuicCallback()],
        optimizers=(optimizer, None),
    )
    trainer.train()
    assert trainer.optimizer.optimizer is optimizer and len(optimizer.state) > 0


def test_prebuilt_optimizer_of_another_kind_is_refused(tmp_path: Path) -> None:
    model = lora(deepseek_v3())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with pytest.raises(
        ConfigError, match=r"optimizer is AdamW, but the config asks for CiuicAdamW\(state_bits=8"
    ):
        Trainer(
            model=model,
            args=arguments(tmp_path),
            train_dataset=Progressions(8),
            callbacks=[CiuicCallback("balanced")],
            optimizers=(optimizer, None),
        )


def test_plain_adamw_config_leaves_the_trainer_optimizer_alone(tmp_path: Path) -> None:
    trainer = build(tmp_path, [CiuicCallback(activations="int8")], optim="adafactor")
    assert type(_built(trainer)).__name__ == "Adafactor"


# -- refused before the first step ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "overrides", "message"),
    [
        ("max", {}, r"TrainingArguments\(max_grad_norm=1.0\) cannot work with .*max_grad_norm=0"),
        ("max", {"max_grad_norm": 0.0, "fp16": True}, r"TrainingArguments\(fp16=True\) .*bf16=True"),
        (
            {"activations": "int8"},
            {"torch_compile": True},
            r"torch_compile=True\) cannot work with activations='int8'",
        ),
        (
            {"checkpointing": "full"},
            {CHECKPOINTING: True},
            r"_checkpointing=True\) and .*twice",
        ),
        ("balanced", {"optim": "adamw_bnb_8bit"}, r"optim='adamw_bnb_8bit'\) conflicts"),
    ],
)
def test_refused_before_the_first_step(
    tmp_path: Path, config: Any, overrides: dict[str, Any], message: str
) -> None:
    model = lora(deepseek_v3())
    before = [m for m in model.modules()]
    field = checkpointing_field(arguments(tmp_path))  # its name in this transformers release
    overrides = {field if key == CHECKPOINTING else key: value for key, value in overrides.items()}
    with pytest.raises(ConfigError, match=message):
        Trainer(
            model=model,
            args=arguments(tmp_path, **overrides),
            train_dataset=Progressions(8),
            callbacks=[CiuicCallback(config)],
        )
    assert ciuic.handle_of(model) is None and [m for m in model.modules()] == before  # refused before apply_


def test_checkpointing_field_of_this_release(tmp_path: Path) -> None:
    names = {field.name for field in dataclasses.fields(TrainingArguments)}
    name = checkpointing_field(arguments(tmp_path))
    assert name in names
    assert name == (
        "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    )


def test_added_after_construction_is_refused(tmp_path: Path) -> None:
    trainer = build(tmp_path, [])
    trainer.add_callback(CiuicCallback("balanced"))
    with pytest.raises(ApplyError, match=r"added after the Trainer was built .*callbacks=\[CiuicCallback"):
        trainer.train()


def test_model_init_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model_init=\.\.\.\) re-creates the model"):
        Trainer(
            model_init=lambda: lora(deepseek_v3()),
            args=arguments(tmp_path),
            train_dataset=Progressions(8),
            callbacks=[CiuicCallback("balanced")],
        )


def test_other_config_on_applied_model_is_refused(tmp_path: Path) -> None:
    model = lora(deepseek_v3())
    ciuic.apply_(model, "balanced")
    with pytest.raises(ApplyError, match=r"already converted by ciuic\.apply_ with another config"):
        Trainer(
            model=model,
            args=arguments(tmp_path),
            train_dataset=Progressions(8),
            callbacks=[CiuicCallback("max")],
        )


def test_detach_gives_the_trainer_back(tmp_path: Path) -> None:
    callback = CiuicCallback("balanced")
    trainer = build(tmp_path, [callback])
    assert {"training_step", "train"} <= set(vars(trainer)) and trainer.optimizer_cls_and_kwargs is not None
    callback.detach()
    assert not {"training_step", "train"} & set(vars(trainer)) and trainer.optimizer_cls_and_kwargs is None


# -- training paths -----------------------------------------------------------------------------


class Padded(Progressions):
    """Rows whose label counts differ (a prefix of -100), so ``num_items_in_batch`` matters."""

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = super().__getitem__(index)
        labels = row["labels"].clone()
        labels[: 3 * (index % 4)] = -100
        return {"input_ids": row["input_ids"], "labels": labels}


def test_accumulation_with_num_items_in_batch(tmp_path: Path) -> None:
    """Chunked loss alone (numerically the standard loss) under accumulation: the Trainer's
    ``num_items_in_batch`` reaches it, so both runs' updates agree to float rounding."""
    kwargs: dict[str, Any] = {
        "max_steps": 4,
        "gradient_accumulation_steps": 2,
        "logging_steps": 1,
        "samples": 16,
    }
    plain = build(tmp_path / "plain", [], **kwargs)
    plain.train_dataset = Padded(16)
    plain.train()
    ours = build(tmp_path / "ciuic", [CiuicCallback(loss="chunked")], **kwargs)
    ours.train_dataset = Padded(16)
    ours.train()
    assert losses(ours) == pytest.approx(losses(plain), rel=1e-5)
    for (name, p), q in zip(plain.model.named_parameters(), ours.model.parameters(), strict=True):
        if p.requires_grad:
            assert torch.allclose(p, q, rtol=1e-4, atol=1e-6), name


def test_max_with_accumulation_trains(tmp_path: Path) -> None:
    trainer = build(
        tmp_path, [CiuicCallback("max")], max_steps=3, gradient_accumulation_steps=2, max_grad_norm=0.0
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    assert all(not torch.equal(before[n], after[n]) for n in before)
    assert all(after[n].grad is None for n in before)  # stepped inside backward, gradients freed


def test_bf16_on_cpu(tmp_path: Path) -> None:
    trainer = build(tmp_path, [CiuicCallback("balanced")], bf16=True, max_steps=3, logging_steps=1)
    trainer.train()
    assert len(losses(trainer)) == 3 and all(torch.isfinite(torch.tensor(losses(trainer))))


def test_bitsandbytes_loaded_model_is_not_quantized_twice(tmp_path: Path) -> None:
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    deepseek_v3().save_pretrained(tmp_path / "base")
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", quantization_config=quantization, device_map="cpu"
    )
    model = lora(model)
    layers = {n: m.weight.data_ptr() for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    trainer = Trainer(
        model=model,
        args=arguments(tmp_path / "out", max_steps=2),
        train_dataset=Progressions(8),
        callbacks=[CiuicCallback("balanced")],
    )
    trainer.train()
    after = {n: m.weight.data_ptr() for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert layers and after == layers
    record = ciuic.handle_of(model).record("weights")
    assert record is not None and not record.changed
    assert any("already quantized by transformers" in why for _, why in record.skipped)


class LogRecorder(TrainerCallback):
    """Stands for a ``report_to`` logger: what its ``on_log`` receives."""

    def __init__(self) -> None:
        self.logs: list[dict[str, Any]] = []

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if logs is not None and "loss" in logs:
            self.logs.append(dict(logs))


def test_memory_meter_in_the_logs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    callback, logger = CiuicCallback("balanced", memory="meter"), LogRecorder()
    trainer = build(tmp_path, [logger, callback], max_steps=2, logging_steps=1, disable_tqdm=False)
    assert trainer.callback_handler.callbacks[0] is callback  # before the report_to loggers, as here
    trainer.train()
    assert [entry[PEAK_KEY] for entry in logger.logs] == [e[PEAK_KEY] for e in trainer.state.log_history[:2]]
    shown = capsys.readouterr()
    assert "'ciuic/peak_bytes': " in shown.out  # printed with the loss
    assert re.search(r"2/2 \[[^\]]*, peak [\d.]+ (KiB|MiB)\]", shown.err), shown.err[
        -500:
    ]  # the bar's postfix
    entries = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(entries) == 2
    for entry in entries:
        parts = sum(
            entry[category_key(c)]
            for c in ("parameters", "gradients", "optimizer", "activations", "temporary")
        )
        assert entry[PEAK_KEY] == parts > 0
    assert entries[1][PEAK_KEY] >= entries[0][PEAK_KEY]  # the peak so far


def test_memory_auto_logs_nothing_on_cpu(tmp_path: Path) -> None:
    trainer = build(tmp_path, [CiuicCallback("balanced")], max_steps=1, logging_steps=1)
    trainer.train()
    assert not any(PEAK_KEY in entry for entry in trainer.state.log_history)


def test_bad_memory_mode() -> None:
    with pytest.raises(ValueError, match="memory='always' is not allowed"):
        CiuicCallback(memory="always")


class InnerCallTrainer(Trainer):
    """A subclass whose ``compute_loss`` calls the model under the PEFT wrapper, not the root."""

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        outputs = model.get_base_model()(**inputs)
        return (outputs.loss, outputs) if return_outputs else outputs.loss


def test_step_scope_covers_a_subclass_calling_an_inner_module(tmp_path: Path) -> None:
    trainer = build(
        tmp_path, [CiuicCallback(activations="int8")], max_steps=2, trainer_class=InnerCallTrainer
    )
    trainer.train()
    assert trainer.state.global_step == 2
    callback = CiuicCallback(activations="int8")
    unscoped = build(tmp_path / "unscoped", [callback], max_steps=2, trainer_class=InnerCallTrainer)
    callback.detach()  # without the scope around training_step the compression never ran: refused
    with pytest.raises(InertTechniqueError):
        unscoped.train()
