"""DeepSeek MoE QLoRA: quantized routed experts under PEFT's ``target_parameters`` LoRA.

The model: the tiny DeepSeek-V3 architecture at hidden size 256 with 3 layers (one dense, two
MoE) and 8 routed experts + 1 shared. At the default 2 layers x 4 experts the bf16 embeddings
and ``lm_head`` (64 x 256 each, left dense as by default) would be about 3% of the weights and
the NF4 ratio would sit at the 0.30 line for a reason unrelated to the experts; with 8 experts
they are about 1%, closer to V2-Lite (64 experts, where they are about 3% of 15.7B weights but
the experts dominate the rest). Nothing is stored int8: the default ``weights="nf4"`` is what is
measured. LoRA (r=8) is built with :func:`ciuic.lora_targets`: MLA attention, the dense MLP,
the shared experts and the routed experts (the MLP linears by weight, ``target_parameters``:
PEFT 0.21 drops their ``target_modules`` on this architecture, peft#3711).
"""

from __future__ import annotations

import tempfile
import warnings

import pytest
import torch
from torch import nn

import ciuic
from ciuic import CiuicConfig, MemoryMeter
from ciuic.weights import QuantizedExperts
from ciuic.weights.experts import fake_routing
from ciuic.weights.functional import storage_bytes
from tests.models import COPIES, deepseek_v3, progressions

DIMS = {"hidden_size": 256, "num_layers": 3, "num_experts": 8}
NF4 = CiuicConfig(weights="nf4")


def _base(seed: int = 0) -> nn.Module:
    return deepseek_v3(**DIMS, seed=seed).to(torch.bfloat16)


ADAPTED = 3 * 5 + 3 + 2 * 3 + 2 * 2
"""LoRA'd tensors: 5 MLA projections a layer, the dense MLP (layer 0), the shared expert's 3
linears and the 2 fused expert parameters a MoE layer (layers 1, 2)."""


def _peft(model: nn.Module, seed: int = 1) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, **ciuic.lora_targets(model)))


def _perturb_adapters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Non-zero LoRA B (PEFT starts it at zero, which would make any LoRA path look right)."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def _order_a() -> tuple[nn.Module, ciuic.CiuicHandle]:
    model = _peft(_base())
    return model, ciuic.apply_(model, NF4)


def _order_b() -> tuple[nn.Module, ciuic.CiuicHandle]:
    base = _base()
    handle = ciuic.apply_(base, NF4)  # a full fine-tuning model: frozen first
    return _peft(base), handle


def _weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's tensors (scales included) less the LoRA adapters, by MemoryMeter."""
    with MemoryMeter(device="cpu", track=(model,)) as meter:
        total = meter.current_bytes
    adapters = storage_bytes(*[p for n, p in model.named_parameters() if "lora_" in n])
    return total - adapters


def _ids(seed: int = 0) -> torch.Tensor:
    return progressions(batch_size=2, seq_len=16, seed=seed)


def test_lora_targets_cover_attention_mlps_shared_and_routed_experts_never_the_router() -> None:
    from peft.tuners.lora.layer import ParamWrapper

    model = _base()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is left out, so nothing to warn about
        targets = ciuic.lora_targets(model)
    assert targets == {
        "target_modules": ["kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "q_a_proj", "q_b_proj"],
        "target_parameters": [
            "down_proj.weight",
            "experts.down_proj",
            "experts.gate_up_proj",
            "gate_proj.weight",
            "up_proj.weight",
        ],
        "lora_dropout": 0.0,
    }
    linears = {
        n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("model.layers.")
    }
    peft_model = _peft(model)
    adapted = {n.split(".lora_A")[0] for n, _ in peft_model.named_parameters() if ".lora_A." in n}
    assert len(adapted) == ADAPTED and not any(".gate." in n for n in adapted)
    routers = {n for n in linears if n.endswith(".gate")}
    assert {f"base_model.model.{n}" for n in linears - routers} <= adapted  # every decoder linear
    mlp = peft_model.base_model.model.model.layers[1].mlp.shared_experts.down_proj
    assert type(mlp) is ParamWrapper and mlp.lora_A["default"].weight.shape == (8, 128)
    assert mlp.lora_B["default"].weight.shape == (256, 8)


def test_lora_targets_for_the_r1_distill_shapes() -> None:
    from tests.models import llama, qwen2

    expected = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    for build in (qwen2, llama):
        assert ciuic.lora_targets(build()) == {"target_modules": expected}


@pytest.mark.parametrize("order", ["peft_then_apply", "apply_then_peft"])
def test_nf4_converts_98_percent_of_frozen_weights_at_under_0_30_of_bf16(order: str) -> None:
    dense = _peft(_base())
    bf16_bytes = _weight_bytes(dense)
    model, handle = _order_a() if order == "peft_then_apply" else _order_b()
    details = handle.applied[0].details
    assert details["coverage"] >= 0.98, details
    ratio = _weight_bytes(model) / bf16_bytes
    assert ratio <= 0.30, ratio
    experts = [m for m in model.modules() if isinstance(m, QuantizedExperts)]
    assert len(experts) == 2 and all(m.gate_up_proj.stride() == (0, 0, 0) for m in experts)


def test_both_orders_give_bitwise_equal_outputs_and_gradients() -> None:
    a, _ = _order_a()
    b, handle_b = _order_b()
    assert "froze_full_fine_tuning" in handle_b.applied[0].details
    adapters = _perturb_adapters(a)
    b.load_state_dict(adapters, strict=False)
    ids = _ids()
    out_a, out_b = a(input_ids=ids, labels=ids), b(input_ids=ids, labels=ids)
    assert torch.equal(out_a.logits, out_b.logits)
    out_a.loss.backward()
    out_b.loss.backward()
    grads_a = {n: p.grad for n, p in a.named_parameters() if p.requires_grad}
    grads_b = {n: p.grad for n, p in b.named_parameters() if p.requires_grad}
    assert grads_a.keys() == grads_b.keys() and len(grads_a) == 2 * ADAPTED
    assert all(g is not None and torch.equal(g, grads_b[n]) for n, g in grads_a.items())
    from peft.tuners.lora.bnb import Linear4bit
    from peft.tuners.lora.layer import ParamWrapper

    from ciuic.weights.expert_lora import QuantizedParamWrapper

    for model in (a, b):
        wrappers = [m for m in model.modules() if type(m) is QuantizedParamWrapper]
        assert len(wrappers) == 4  # b: swapped by the pre-hook before their first forward
        mlps = [m for n, m in model.named_modules() if n.endswith(("gate_proj", "up_proj", "down_proj"))]
        assert len(mlps) == 9 and all(type(m) is Linear4bit for m in mlps)  # PEFT's own bnb LoRA layer
        assert not any(type(m) is ParamWrapper for m in model.modules())


@pytest.mark.parametrize("fmt", ["int8", "fp4"])
def test_mlp_weight_lora_becomes_peft_bnb_layer_in_either_order(fmt: str) -> None:
    """The MLPs' ``target_parameters`` LoRA (``gate_proj.weight``...) over an int8/FP4 linear:
    PEFT's bitsandbytes LoRA class whichever came first, and the same outputs bitwise."""
    config = CiuicConfig(weights=fmt)
    a = _peft(_base())
    ciuic.apply_(a, config)
    b = _base()
    ciuic.apply_(b, config)
    b = _peft(b)
    expected = "Linear8bitLt" if fmt == "int8" else "Linear4bit"
    for model in (a, b):
        mlp = model.base_model.model.model.layers[0].mlp.gate_proj
        assert type(mlp).__module__ == "peft.tuners.lora.bnb" and type(mlp).__name__ == expected
    b.load_state_dict(_perturb_adapters(a), strict=False)
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


def test_mlp_weight_lora_over_a_pruned_linear_is_peft_lora_on_the_pruned_weight() -> None:
    """Pruned + NF4 under a 2-D ``ParamWrapper``: turned into ``lora.Linear`` over the stored
    layer, the same function as PEFT's ``ParamWrapper`` over the dense pruned weight (fp32)."""
    from peft.tuners.lora import layer as lora

    from ciuic.weights import PrunedLinear, dense_state_dict

    model = _peft(deepseek_v3(**DIMS))
    adapters = _perturb_adapters(model)
    handle = ciuic.apply_(model, CiuicConfig(weights={"format": "nf4", "prune": "2:4"}))
    mlp = model.base_model.model.model.layers[1].mlp.shared_experts.up_proj
    assert type(mlp) is lora.Linear and isinstance(mlp.base_layer, PrunedLinear)
    dense = deepseek_v3(**DIMS)
    dense.load_state_dict(dense_state_dict(model.base_model.model))
    dense = _peft(dense)
    dense.load_state_dict(adapters, strict=False)
    reference = dense.base_model.model.model.layers[1].mlp.shared_experts.up_proj
    assert type(reference) is lora.ParamWrapper
    x = torch.randn(5, 256, requires_grad=True)
    out = mlp(x)
    torch.testing.assert_close(out, reference(x), rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert mlp.lora_A["default"].weight.grad is not None
    ciuic.remove_(handle.model)
    assert type(mlp) is lora.ParamWrapper and type(mlp.base_layer) is nn.Linear


def test_expert_lora_equals_peft_on_the_dequantized_dense_experts() -> None:
    """The per-expert delta is PEFT's delta: PEFT's own ParamWrapper forward on a dense model
    holding the dequantized weights gives the same logits (fp32: rounding only)."""
    quantized = _peft(deepseek_v3(**DIMS))
    adapters = _perturb_adapters(quantized)
    ciuic.apply_(quantized, NF4)
    from ciuic.weights import dense_state_dict

    dense = deepseek_v3(**DIMS)
    dense.load_state_dict(dense_state_dict(quantized.base_model.model))
    dense = _peft(dense)
    dense.load_state_dict(adapters, strict=False)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(quantized(ids).logits, dense(ids).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("order", ["peft_then_apply", "apply_then_peft"])
def test_remove_restores_peft_classes_and_dequantized_experts(order: str) -> None:
    from peft.tuners.lora import layer as lora
    from peft.tuners.lora.layer import ParamWrapper

    from ciuic.weights.linear import is_bnb_linear

    model, handle = _order_a() if order == "peft_then_apply" else _order_b()
    adapters = _perturb_adapters(model)
    ids = _ids()
    with torch.no_grad():
        before = model(ids).logits
    handle_model = handle.model
    ciuic.remove_(handle_model)
    wrappers = [m for m in model.modules() if isinstance(m, ParamWrapper)]
    # peft_then_apply: the MLPs' ParamWrappers come back; apply_then_peft: PEFT built lora.bnb
    # layers over the quantized MLPs, which become the lora.Linear it builds over dense ones.
    assert len(wrappers) == (4 + 9 if order == "peft_then_apply" else 4)
    assert all(type(w) is ParamWrapper for w in wrappers)
    assert sum(type(m) is lora.Linear for m in model.modules()) == (
        5 * 3 if order == "peft_then_apply" else 5 * 3 + 9
    )
    assert not any(isinstance(m, QuantizedExperts) for m in model.modules())
    assert not any(is_bnb_linear(m) for m in model.modules())
    hooks = [h for m in model.modules() for h in m._forward_pre_hooks.values()]
    assert not any(type(h).__name__ == "SwapHook" for h in hooks)
    with torch.no_grad():
        after = model(ids).logits  # PEFT's own dense path over the dequantized experts
    torch.testing.assert_close(after, before, rtol=2e-2, atol=2e-2)  # bf16: baddbmm vs two matmuls
    assert all(torch.equal(p, adapters[n]) for n, p in model.named_parameters() if "lora_" in n)
    if order == "apply_then_peft":  # the full fine-tuning model it froze is trainable again
        assert all(p.requires_grad for p in handle_model.parameters() if "lora_" not in str(p))


def test_merge_is_refused_with_the_remedy() -> None:
    model, _ = _order_a()
    with pytest.raises(ciuic.ApplyError, match=r"cannot merge the LoRA of .*ciuic\.remove_"):
        model.merge_adapter()


def test_disabled_adapters_give_the_base_model() -> None:
    model, _ = _order_a()
    _perturb_adapters(model)
    ids = _ids()
    with torch.no_grad():
        with model.disable_adapter():
            off = model(ids).logits
        on = model(ids).logits
        for module in model.modules():
            if hasattr(module, "lora_B"):
                for linear in module.lora_B.values():
                    linear.weight.zero_()
        zero = model(ids).logits
    assert torch.equal(off, zero) and not torch.equal(on, off)


@pytest.mark.parametrize("how", sorted(COPIES))
def test_a_converted_model_with_expert_lora_survives_copies(how: str) -> None:
    model, _ = _order_a()
    _perturb_adapters(model)
    ids = _ids()
    copy = COPIES[how](model)
    experts = [m for m in copy.modules() if isinstance(m, QuantizedExperts)]
    assert experts and all(m.down_proj.stride() == (0, 0, 0) for m in experts)
    with torch.no_grad():
        assert torch.equal(copy(ids).logits, model(ids).logits)
    ciuic.remove_(copy)
    assert not any(isinstance(m, QuantizedExperts) for m in copy.modules())


def test_placeholders_stay_out_of_state_dict_and_are_never_materialized() -> None:
    model, _ = _order_a()
    state = model.state_dict()
    assert not any(k.endswith(("experts.base_layer.base_layer.gate_up_proj", ".down_proj")) for k in state)
    model.to(torch.float32)
    experts = [m for m in model.modules() if isinstance(m, QuantizedExperts)]
    assert all(
        m.gate_up_proj.dtype == torch.float32 and m.gate_up_proj.stride() == (0, 0, 0) for m in experts
    )
    assert all(m.gate_up_proj.untyped_storage().nbytes() == 4 for m in experts)


def test_fake_tensors_store_the_same_bytes_and_run_with_balanced_routing() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    real = [m for m in _order_a()[0].modules() if isinstance(m, QuantizedExperts)]
    with torch.device("meta"):  # the planner's way: build on meta, then fake storage
        model = _peft(deepseek_v3(**DIMS))
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device="cpu")
        chains = [m for n, m in model.named_modules() if n.endswith("mlp.experts")]
        stored = []
        for chain in chains:
            inner = chain.base_layer
            dense = inner.base_layer
            inner.base_layer = QuantizedExperts(dense, "nf4")
            stored.append(storage_bytes(*inner.base_layer.buffers()))
            from ciuic.weights.expert_lora import swap_chain

            swap_chain(chain)
        hidden = torch.randn(10, 256, requires_grad=True)
        index = torch.zeros(10, 2, dtype=torch.long)
        out = chains[0](hidden, index, torch.ones(10, 2))
        out.float().sum().backward()
        lora_grads = [p.grad for n, p in chains[0].named_parameters() if "lora_" in n]
    assert stored == [storage_bytes(*m.buffers()) for m in real]
    assert out.shape == (10, 256) and len(lora_grads) == 4 and all(g is not None for g in lora_grads)


def test_fake_routing_runs_a_dense_experts_module_under_fake_tensors() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    def args() -> tuple[torch.Tensor, ...]:
        index = torch.stack([torch.randperm(8)[:2] for _ in range(6)])
        return torch.randn(6, 256, dtype=torch.bfloat16), index, torch.rand(6, 2, dtype=torch.bfloat16)

    real = _base().model.layers[1].mlp.experts
    inputs = args()
    expected = real(*inputs)
    with fake_routing(real):  # on real tensors: the real routing, transformers' result
        torch.testing.assert_close(real(*inputs), expected, rtol=2e-2, atol=2e-2)
    with FakeTensorMode():
        experts = deepseek_v3(**DIMS).model.layers[1].mlp.experts
        with fake_routing(experts):
            out = experts(*(t.float() if t.is_floating_point() else t for t in args()))
        assert "forward" not in experts.__dict__
    assert out.shape == (6, 256)


LR = 1e-3
"""AdamW's lr in the parity runs. At 1e-3 the NF4 run ends 0.0-2.3% from the bf16 one and
0.05-0.7% from plain PEFT on its dequantized weights (the same function in exact arithmetic;
seeds 0-2: ``python bench/moe.py --seeds 0,1,2``). At 3e-3 runs of this tiny model diverge
chaotically: NF4 ends 5.3-8.8% from bf16, and 1.2-8.1% from that dequantized control as well
(``--lr 3e-3``), so a 3% comparison there would measure the chaos, not the quantization."""


def _train(model: nn.Module, steps: int, lr: float = LR) -> list[float]:
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr)
    losses = []
    for step in range(steps):
        ids = progressions(batch_size=4, seq_len=16, seed=step)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def train_pair(steps: int, lr: float = LR, seed: int = 0) -> tuple[nn.Module, list[float], list[float]]:
    """The NF4 (order a) model of base ``seed`` and its losses, with the dense bf16 LoRA run's
    losses, same adapters and batches."""
    dense_losses = _train(_peft(_base(seed)), steps, lr)
    model = _peft(_base(seed))
    ciuic.apply_(model, NF4)
    return model, _train(model, steps, lr), dense_losses


def _dequantized(model: nn.Module, seed: int = 0) -> nn.Module:
    """The bf16 base model holding ``model``'s dequantized weights (``dense_state_dict``)."""
    from ciuic.weights import dense_state_dict

    dequantized = _base(seed)
    dequantized.load_state_dict(dense_state_dict(model))
    return dequantized


def dequantized_losses(steps: int, lr: float = LR, seed: int = 0) -> list[float]:
    """Plain PEFT's LoRA run on the bf16 model holding the NF4-dequantized weights: what the NF4
    run computes in exact arithmetic, so its gap to the NF4 run is Ciuic's own error."""
    quantized = _base(seed)
    ciuic.apply_(quantized, NF4)
    return _train(_peft(_dequantized(quantized, seed)), steps, lr)


def final_loss(losses: list[float]) -> float:
    """Mean of the last 10 steps' losses (one step's batch alone is noisy)."""
    return sum(losses[-10:]) / len(losses[-10:])


def round_trip_errors(model: nn.Module, seed: int = 0) -> dict[str, float]:
    """Mean |logit| gaps on held-out batches, all with ``model``'s trained adapter saved by
    ``save_pretrained`` and loaded by plain PEFT (``PeftModel.from_pretrained``):

    - ``adapter``: plain PEFT on the dense bf16 model against ``model`` (NF4, Ciuic's forward);
    - ``nf4``: the NF4 error of the adapted model, by plain PEFT alone: the dense bf16 model
      against the bf16 model holding the dequantized NF4 weights (``dense_state_dict``);
    - ``rounding``: ``model`` against that dequantized model in plain PEFT: the same function
      in exact arithmetic, apart in bf16 because PEFT adds the delta into the bf16 weight
      (``W + s*B@A``) where Ciuic adds ``s*B@(A@x)`` to the NF4 layer's output;
    - ``nf4_without_lora``: the dense model against the NF4 model, adapters disabled.

    ``adapter`` within ``nf4`` (up to ``rounding``) means the round trip adds nothing to the
    quantization error. ``seed`` is the base model's (:func:`train_pair`'s)."""
    from peft import PeftModel

    ids = _ids(seed=1000)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        loaded = PeftModel.from_pretrained(_base(seed), folder)
        loaded_dequantized = PeftModel.from_pretrained(_dequantized(model.base_model.model, seed), folder)
    with torch.no_grad():
        dense, ours = loaded(ids).logits.float(), model(ids).logits.float()
        reference = loaded_dequantized(ids).logits.float()
        errors = {
            "adapter": (dense - ours).abs().mean(),
            "nf4": (dense - reference).abs().mean(),
            "rounding": (ours - reference).abs().mean(),
        }
        with loaded.disable_adapter(), model.disable_adapter():
            errors["nf4_without_lora"] = (loaded(ids).logits.float() - model(ids).logits.float()).abs().mean()
    return {name: float(error) for name, error in errors.items()}


@pytest.mark.slow
def test_adapters_train_within_3_percent_of_bf16_lora_and_load_into_plain_peft() -> None:
    model, losses, dense_losses = train_pair(100)
    final, dense_final = final_loss(losses), final_loss(dense_losses)
    assert losses[-1] < 0.8 * losses[0]  # it learned
    assert abs(final - dense_final) <= 0.03 * dense_final, (final, dense_final)
    control = final_loss(dequantized_losses(100))  # the same run in exact arithmetic
    assert abs(final - control) <= 0.02 * control, (final, control)
    errors = round_trip_errors(model)
    assert errors["rounding"] <= 0.15 * errors["nf4"], errors  # the same adapter function
    assert errors["adapter"] <= 1.05 * errors["nf4"], errors


def test_ddp_wraps_the_quantized_experts_without_touching_their_placeholders(tmp_path) -> None:
    """DDP broadcasts every parameter it is not told to ignore, and refuses 0-stride ones."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from ciuic.weights.experts import DDP_IGNORE_ATTR, placeholder_names

    model, _ = _order_a()
    names = placeholder_names(model)
    assert len(names) == 4 and getattr(model, DDP_IGNORE_ATTR) == names
    assert all(model.get_parameter(name).stride() == (0, 0, 0) for name in names)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        wrapped = DistributedDataParallel(model)
        assert wrapped.parameters_to_ignore == set(names)
        ids = torch.randint(0, 64, (1, 8))
        wrapped(input_ids=ids, labels=ids).loss.backward()
    finally:
        dist.destroy_process_group()
    ciuic.remove_(model)
    assert not hasattr(model, DDP_IGNORE_ATTR)
