"""Saved-tensor hooks on small modules: what is packed, what is left alone, and how."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ciuic
from ciuic import CiuicConfig, MemoryMeter
from ciuic.activations import ActivationOptions, CodecRule, SavedTensorHooks, apply_activations
from ciuic.errors import ConfigError, TechniqueUnavailableError
from tests.models import progressions, qwen2


class Attention(nn.Module):
    """A softmax saved twice (by softmax and by the matmul), an index, a dropout mask."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(64, 64)
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.proj(x)
        probs = torch.softmax(q @ x.transpose(-1, -2) / 8, dim=-1)
        out = self.drop(probs) @ x
        idx = torch.arange(out.shape[-2] - 1, -1, -1)
        return out[:, idx] * self.proj.weight.detach()[0]  # a weight alias that is no Parameter


def _grads(model: nn.Module, x: torch.Tensor, retain: bool = False) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    loss = model(x).square().sum()
    loss.backward(retain_graph=retain)
    grads = [p.grad.clone() for p in model.parameters()]
    if retain:
        model.zero_grad(set_to_none=True)
        loss.backward()
        assert all(
            torch.equal(g, p.grad) for g, p in zip(grads, model.parameters(), strict=True)
        )  # unpacked twice
    return grads


def _hooked(codec: str, offload: bool = False, **options: object) -> tuple[nn.Module, SavedTensorHooks]:
    torch.manual_seed(0)
    model = Attention()
    hooks = SavedTensorHooks(model, codec=codec, offload=offload, options=ActivationOptions(**options))
    return model, hooks.install()


def test_what_is_packed_and_what_is_left_alone() -> None:
    model, hooks = _hooked("int8")
    x = torch.randn(2, 128, 64, requires_grad=True)
    _grads(model, x)
    stats = hooks.stats
    # parameters (the weight and its detached alias, by storage) are never packed
    assert stats.parameters == 2
    assert stats.by_codec["mask"] == 1  # the dropout mask, 1 bit per element
    assert stats.deduplicated >= 1  # the softmax saved twice is packed once
    assert stats.kept >= 1  # the int64 index
    assert stats.by_codec["int8"] >= 3


def test_unpacking_twice_and_lossless_offload() -> None:
    x = torch.randn(2, 128, 64, requires_grad=True)
    reference = Attention()  # no hooks at all: the independent exact gradients
    reference.load_state_dict(_hooked("none")[0].state_dict())
    exact = _grads(reference, x)
    model, hooks = _hooked("none", offload=True)
    got = _grads(model, x, retain=True)
    assert all(torch.equal(a, b) for a, b in zip(got, exact, strict=True))
    assert hooks.stats.offloaded > 0


@pytest.mark.parametrize("codec", ["int8", "int4", "int2", "fp8"])
def test_compressed_gradients_are_close_and_offload_changes_nothing(codec: str) -> None:
    x = torch.randn(2, 128, 64, requires_grad=True)
    exact = torch.cat([g.flatten() for g in _grads(_hooked("none")[0], x)])
    packed = torch.cat([g.flatten() for g in _grads(_hooked(codec)[0], x, retain=True)])
    moved = torch.cat([g.flatten() for g in _grads(_hooked(codec, offload=True)[0], x)])
    assert torch.equal(packed, moved)  # offloading compressed data is lossless
    # a toy whose softmax is every byte: the figures on a real model are in test_acceptance
    floor = {"int8": 0.999, "fp8": 0.995, "int4": 0.97, "int2": 0.75}[codec]
    assert torch.nn.functional.cosine_similarity(packed, exact, dim=0) >= floor


def test_meter_counts_packed_bytes_and_host_copies() -> None:
    x = torch.randn(4, 256, 64, requires_grad=True)
    peaks = {}
    for codec, offload in (("none", False), ("int4", False), ("int4", True)):
        model, _ = _hooked(codec, offload)
        with MemoryMeter(device="cpu", track=(model,)) as meter:
            model(x).square().sum().backward()
        peaks[codec, offload] = (meter.peak_by_category["activations"], meter.peak_offloaded_bytes)
    assert peaks["none", False][0] >= 3.5 * peaks["int4", False][0]
    assert peaks["none", False][1] == 0
    assert peaks["int4", True][0] <= 0.1 * peaks["int4", False][0]
    assert peaks["int4", True][1] >= peaks["int4", False][0] * 0.9


def test_tiny_and_non_finite_tensors_are_kept_exact() -> None:
    lin = nn.Linear(8, 8)
    hooks = SavedTensorHooks(lin, codec="int2", offload=False).install()
    x = torch.randn(4, 8, requires_grad=True)
    lin(x).sum().backward()  # 32 elements: under min_numel
    assert hooks.stats.packed == 0 and hooks.stats.kept == 1
    big = nn.Linear(64, 64)
    y = torch.randn(64, 64)
    y[3, 5] = float("inf")
    exact = torch.autograd.grad(big(y).sum(), big.weight)[0]
    hooks = SavedTensorHooks(big, codec="int2", offload=False).install()
    assert torch.equal(torch.autograd.grad(big(y).sum(), big.weight)[0], exact)
    assert hooks.stats.by_codec == {"none": 1}  # inf in the input: kept exact


def test_rules_opt_modules_out() -> None:
    x = torch.randn(2, 128, 64, requires_grad=True)
    exact = _grads(_hooked("none")[0], x)
    model, hooks = _hooked("int2", rules=(CodecRule("none", types=("Attention",)),))
    assert torch.equal(_grads(model, x)[0], exact[0])
    assert hooks.stats.packed == 1 and hooks.stats.by_codec == {"mask": 1}


def test_dropout_mask_is_one_bit_and_exact() -> None:
    drop = nn.Sequential(nn.Linear(64, 64), nn.Dropout(0.25))
    x = torch.randn(64, 64, requires_grad=True)
    torch.manual_seed(5)
    exact = torch.autograd.grad(drop(x).square().sum(), x)[0]
    hooks = SavedTensorHooks(drop, codec="none", offload=True).install()
    torch.manual_seed(5)
    assert torch.equal(torch.autograd.grad(drop(x).square().sum(), x)[0], exact)
    assert hooks.stats.by_codec["mask"] == 1


def test_exception_in_forward_leaves_no_hooks_behind() -> None:
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU())
    hooks = SavedTensorHooks(model, codec="int8", offload=False).install()
    with pytest.raises(RuntimeError):
        model(torch.randn(3, 65))
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None
    model(torch.randn(64, 64)).sum().backward()
    assert hooks.stats.packed == 2  # the input of the linear layer and the ReLU's output


def test_bad_options_name_field_and_value() -> None:
    with pytest.raises(ConfigError, match=r"ActivationOptions.group_size=3"):
        ActivationOptions(group_size=3)
    with pytest.raises(ConfigError, match=r"CodecRule.codec='int3'.*'int2'"):
        CodecRule("int3", modules=("x",))
    with pytest.raises(ConfigError, match="matches nothing"):
        CodecRule("int8")
    with pytest.raises(ConfigError, match=r"CodecRule.types='Norm'"):
        CodecRule("int8", types="Norm")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"CodecRule.modules=5"):
        CodecRule("int8", modules=5)  # type: ignore[arg-type]
    assert CodecRule("int8", modules=["a"]).modules == ("a",)  # type: ignore[arg-type]


def test_torch_compile_is_refused_with_the_remedy() -> None:
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU())
    with pytest.raises(TechniqueUnavailableError, match="original model"):
        ciuic.apply_(torch.compile(model), CiuicConfig(activations="int8"))
    ciuic.apply_(model, CiuicConfig(activations="int8"))
    with pytest.raises(TechniqueUnavailableError, match="uncompiled"):
        torch.compile(model)(torch.randn(4, 64)).sum().backward()
    ciuic.remove_(model)


def test_apply_activations_with_options_and_undo() -> None:
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 1))
    record = apply_activations(model, CiuicConfig(activations="int4"), ActivationOptions(group_size=32))
    model(torch.randn(64, 64)).sum().backward()
    # two linear inputs and GELU's input; the first is weight-shaped (64 x 64): int8
    assert record.details["stats"].by_codec == {"int8": 1, "int4": 2}
    record.undo()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_bitsandbytes_4bit_layer_weights_are_left_alone() -> None:
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    frozen = bnb.nn.Linear4bit(256, 256, compute_dtype=torch.float32, quant_type="nf4")
    frozen.load_state_dict(nn.Linear(256, 256).state_dict())
    frozen = frozen.to("cpu").requires_grad_(False)  # .to() quantizes the weight
    model = nn.Sequential(nn.Linear(256, 256), frozen, nn.GELU(), nn.Linear(256, 1))
    x = torch.randn(128, 256)
    exact = torch.autograd.grad(model(x).sum(), model[0].weight)[0]
    stats = apply_activations(model, CiuicConfig(offload={"activations"})).details["stats"]
    assert torch.equal(torch.autograd.grad(model(x).sum(), model[0].weight)[0], exact)
    assert stats.parameters >= 1 and stats.offloaded == 3  # the 4-bit weight stays where it is


def test_many_steps_do_not_accumulate_state() -> None:
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 1))
    hooks = SavedTensorHooks(model, codec="int4", offload=True).install()
    for _ in range(5):
        model(torch.randn(64, 64)).sum().backward()
    assert len(hooks._entries) == 0  # every packed entry was freed with its graph
    model(torch.randn(64, 64))  # the next forward forgets the freed segments
    assert sum(len(refs) for refs in hooks._segments.values()) == 3


def test_loss_temporaries_with_a_codec_are_no_higher_than_without() -> None:
    # issue #10, 9c: encoding the loss's saved logits took float32 scratch of the logits' size
    peaks = {}
    for codec in ("none", "int8"):
        model = qwen2(vocab_size=4096, hidden_size=32)  # the loss is most of the step
        record = ciuic.apply_(model, CiuicConfig(activations=codec)).applied if codec != "none" else None
        ids = progressions(batch_size=2, seq_len=64, vocab_size=4096)
        with MemoryMeter(device="cpu", track=(model,)) as meter:
            model(input_ids=ids, labels=ids).loss.backward()
        peaks[codec] = (meter.peak_bytes, meter.peak_by_category["temporary"])
        if record is not None:
            assert record[0].details["stats"].by_codec.get("int8", 0) > 0  # the blocks are packed
    assert peaks["int8"][1] <= peaks["none"][1]
    assert peaks["int8"][0] <= peaks["none"][0]
