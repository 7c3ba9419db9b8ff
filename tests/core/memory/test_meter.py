import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from ciuic.memory import CATEGORIES, DEVICE_CATEGORIES, MemoryMeter, tag_allocations, tag_tensor
from tests.gpu import requires_cuda

LINEAR_PARAMS = 1024 * 1024 + 1024  # 1,049,600 elements
FP32 = 4
ADAMW_STEP_COUNTERS = 2 * FP32  # one float32 `step` tensor per parameter


def _linear_adamw_step(device: str = "cpu") -> MemoryMeter:
    with MemoryMeter(device=device) as meter:
        model = nn.Linear(1024, 1024, device=device)
        optimizer = torch.optim.AdamW(model.parameters())
        model(torch.randn(16, 1024, device=device)).sum().backward()
        optimizer.step()
    return meter


def _assert_linear_adamw_figures(meter: MemoryMeter) -> None:
    at_peak = meter.peak_by_category
    assert at_peak["parameters"] == FP32 * LINEAR_PARAMS
    assert at_peak["gradients"] == FP32 * LINEAR_PARAMS
    assert at_peak["optimizer"] == 2 * FP32 * LINEAR_PARAMS + ADAMW_STEP_COUNTERS
    assert sum(at_peak[c] for c in DEVICE_CATEGORIES) == meter.peak_bytes
    assert at_peak["offloaded"] == 0


def test_linear_adamw_step_from_model_creation_is_exact():
    _assert_linear_adamw_figures(_linear_adamw_step())


def test_linear_adamw_step_is_exact_under_fake_tensor_mode():
    with FakeTensorMode():
        meter = _linear_adamw_step()
    _assert_linear_adamw_figures(meter)
    real = _linear_adamw_step()
    assert meter.peak_bytes == real.peak_bytes
    assert meter.peak_by_category == real.peak_by_category


def test_a_real_meter_does_not_count_a_fake_step_run_inside_it():
    """The planner prices a run's first step on fake tensors inside the run's own meter (the
    budget guard): the fake step holds no memory, and the real meter must not count it."""
    with MemoryMeter(device="cpu") as outer:
        with FakeTensorMode():
            inner = _linear_adamw_step()
        kept = torch.zeros(1000)
    _assert_linear_adamw_figures(inner)
    assert outer.peak_bytes == kept.nbytes


def test_same_run_same_bytes():
    first, second = _linear_adamw_step().reading(), _linear_adamw_step().reading()
    assert first == second


@pytest.mark.parametrize("tracked", [True, False])
def test_forward_alone_reports_the_saved_input_as_activations(tracked):
    model = nn.Linear(1024, 1024)
    x = torch.randn(8, 1024)
    with MemoryMeter(track=(model,) if tracked else ()) as meter:
        y = model(x)
    at_peak = meter.peak_by_category
    assert at_peak["activations"] == x.nbytes  # addmm saves its input for the weight's gradient
    assert at_peak["temporary"] == y.nbytes
    assert at_peak["parameters"] == (FP32 * LINEAR_PARAMS if tracked else 0)


def test_saved_tensors_stop_being_activations_after_backward():
    model = nn.Sequential(nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 1))
    x = torch.randn(64, 256)
    with MemoryMeter(track=(model,)) as meter:
        model(x).sum().backward()
        after_backward = torch.empty(10_000_000, dtype=torch.uint8)  # a new, larger peak
    at_peak = meter.peak_by_category
    assert at_peak["activations"] == 0  # nothing is saved for backward any more
    assert at_peak["temporary"] >= after_backward.nbytes


def test_frozen_parameters_are_measured_without_error():
    model = nn.Linear(512, 512)
    model.weight.requires_grad_(False)  # LoRA-style frozen base weight
    with MemoryMeter(track=(model,)) as meter:
        model(torch.randn(4, 512, requires_grad=True)).sum().backward()
    assert meter.peak_by_category["parameters"] == FP32 * (512 * 512 + 512)
    assert model.weight.grad is None
    assert model.bias.grad is not None


def test_peak_breakdown_is_the_one_at_the_moment_of_the_peak():
    with MemoryMeter() as meter:
        a = torch.empty(1000, dtype=torch.uint8)
        b = torch.empty(3000, dtype=torch.uint8)
        del a
        c = torch.empty(500, dtype=torch.uint8)
        del b, c
    assert meter.peak_bytes == 4000
    assert meter.current_bytes == 0
    assert meter.peak_by_category["temporary"] == 4000


def test_views_and_inplace_ops_are_not_new_allocations():
    base = torch.randn(1000)
    with MemoryMeter() as meter:
        view = base[10:].t()
        view.mul_(2)
    assert meter.peak_bytes == 0


def test_resize_is_followed():
    with MemoryMeter() as meter:
        t = torch.empty(0)
        t.resize_(1000)
    assert meter.peak_bytes == 4000


def test_offloaded_allocations_are_host_bytes_not_device_bytes():
    with MemoryMeter(device="cpu") as meter:
        device_tensor = torch.ones(1000)
        with tag_allocations("offloaded"):
            host_copy = device_tensor.clone()
        late = torch.zeros(250)
        tag_tensor(late, "offloaded")
    assert meter.peak_bytes == device_tensor.nbytes + late.nbytes
    assert meter.peak_by_category["offloaded"] == host_copy.nbytes
    assert meter.peak_offloaded_bytes == host_copy.nbytes + late.nbytes


def test_tagged_activation_allocations():
    with MemoryMeter() as meter, tag_allocations("activations"):
        packed = torch.zeros(100, dtype=torch.int8)
    assert meter.peak_by_category["activations"] == packed.nbytes


def test_optimizer_and_model_built_before_the_meter_can_be_tracked():
    model = nn.Linear(64, 64)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 64)).sum().backward()
    optimizer.step()
    with MemoryMeter(track=(model, optimizer)) as meter:
        pass
    params = FP32 * (64 * 64 + 64)
    assert meter.peak_by_category == {
        "parameters": params, "gradients": params, "optimizer": 2 * params + ADAMW_STEP_COUNTERS,
        "activations": 0, "temporary": 0, "offloaded": 0,
    }  # fmt: skip


def test_report_lists_every_category_and_the_peak():
    report = _linear_adamw_step().report()
    for category in (*DEVICE_CATEGORIES, "peak (device)", "offloaded (host)"):
        assert category in report
    assert "4,198,400" in report
    assert set(CATEGORIES) == {*DEVICE_CATEGORIES, "offloaded"}


def test_misuse_is_refused():
    meter = MemoryMeter()
    with meter, pytest.raises(RuntimeError, match="already running"):
        meter.__enter__()
    with pytest.raises(TypeError, match="modules and optimizers, not Tensor"):
        MemoryMeter(track=(torch.ones(1),))
    with pytest.raises(ValueError, match="category='weights' is unknown"), tag_allocations("weights"):
        pass


def test_meter_leaves_no_hooks_behind():
    model = nn.Linear(8, 8)
    with MemoryMeter(track=(model,)):
        pass
    assert not model.weight._post_accumulate_grad_hooks
    with MemoryMeter() as meter:
        kept = torch.ones(10)
    assert meter.peak_bytes == meter.current_bytes == 40
    more = torch.ones(100)  # after exit nothing is counted, allocations nor frees
    del kept, more
    assert meter.peak_bytes == meter.current_bytes == 40
    with pytest.raises(RuntimeError, match="already been used"):
        meter.__enter__()


@requires_cuda
def test_cuda_figures_match_the_caching_allocator():
    meter = _linear_adamw_step("cuda")
    _assert_linear_adamw_figures(meter)
    growth = meter.reading().cuda_max_allocated
    assert growth is not None
    assert meter.peak_bytes <= growth <= meter.peak_bytes * 1.01 + 64 * 512
