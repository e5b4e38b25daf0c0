"""The hook module: taps on (nested) modules, handles always removed, stops that end a forward and catch only
themselves, and the run-until-a-module helpers."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from nc_finetune.backbones.hooks import (
    ForwardStop,
    ForwardStopped,
    HookSet,
    input_of,
    output_of,
    tap_input,
    tap_output,
)


class Counting(nn.Module):
    """A linear layer that counts its calls."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.lin(x)


class Net(nn.Module):
    """block0 -> block1 (nested: inner.a -> inner.b) -> block2."""

    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.block0 = Counting(d)
        self.block1 = nn.Sequential()
        self.block1.add_module("a", Counting(d))
        self.block1.add_module("b", Counting(d))
        self.block2 = Counting(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block2(torch.relu(self.block1(self.block0(x))))


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture
def net() -> Net:
    torch.manual_seed(0)
    return Net()


def test_taps_on_nested_modules_see_the_real_tensors(net) -> None:
    x = torch.randn(3, 4)
    seen: dict[str, torch.Tensor] = {}
    with HookSet() as hooks:
        hooks.on_output(net.block1, lambda m, a, out: seen.__setitem__("block1", out))
        hooks.on_output(net.block1.a, lambda m, a, out: seen.__setitem__("a", out))
        hooks.on_input(net.block1.b, lambda m, a: seen.__setitem__("b_in", a[0]))
        hooks.on_input(net.block2, lambda m, a, kw: seen.__setitem__("block2_kw", kw), with_kwargs=True)
        y = net(x)
        assert len(hooks) == 4
    a = net.block1.a.lin(net.block0.lin(x))  # independent recomputation
    torch.testing.assert_close(seen["a"], a)
    torch.testing.assert_close(seen["b_in"], a)
    torch.testing.assert_close(seen["block1"], net.block1.b.lin(a))
    torch.testing.assert_close(y, net.block2.lin(torch.relu(seen["block1"])))
    assert seen["block2_kw"] == {}
    assert hook_count(net) == 0


def test_an_observer_never_replaces_the_output_or_input(net) -> None:
    x = torch.randn(2, 4)
    expected = net(x)
    with HookSet() as hooks:
        hooks.on_output(net.block0, lambda m, a, out: torch.zeros_like(out))  # a plain hook would replace it
        hooks.on_input(net.block2, lambda m, a: (torch.zeros_like(a[0]),))
        torch.testing.assert_close(net(x), expected)


def test_handles_are_removed_when_the_block_raises(net) -> None:
    with pytest.raises(ValueError, match="boom"), HookSet() as hooks:
        hooks.on_output(net.block0, lambda m, a, out: None)
        hooks.on_input(net.block1.a, lambda m, a: None, with_kwargs=False)
        assert hook_count(net) == 2
        raise ValueError("boom")
    assert hook_count(net) == 0


def test_handles_are_removed_when_a_hook_raises(net) -> None:
    def fail(m, a, out):
        raise RuntimeError("hook failed")

    with pytest.raises(RuntimeError, match="hook failed"), HookSet() as hooks:
        hooks.on_output(net.block1.b, fail)
        net(torch.randn(1, 4))
    assert hook_count(net) == 0


def test_remove_by_hand_and_reuse(net) -> None:
    hooks = HookSet()
    hooks.on_output(net.block0, lambda m, a, out: None)
    hooks.remove()
    assert hook_count(net) == 0 and len(hooks) == 0
    hooks.on_output(net.block0, lambda m, a, out: None)
    assert hook_count(net) == 1
    hooks.remove()
    handle = tap_output(net.block2, lambda m, a, out: None)
    handle2 = tap_input(net.block2, lambda m, a: None)
    assert hook_count(net) == 2
    handle.remove()
    handle2.remove()
    assert hook_count(net) == 0


def test_a_stop_ends_the_forward_after_the_tapped_module(net) -> None:
    stop = ForwardStop()
    with HookSet() as hooks:
        hooks.on_output(net.block1.a, lambda m, a, out: stop())
        for _ in range(2):  # one stop serves several forwards
            with stop:
                net(torch.randn(2, 4))
    assert (net.block0.calls, net.block1.a.calls, net.block1.b.calls, net.block2.calls) == (2, 2, 0, 0)
    assert hook_count(net) == 0


def test_a_stop_catches_only_itself() -> None:
    outer, inner = ForwardStop(), ForwardStop()
    with outer, inner:
        outer()
    with pytest.raises(ForwardStopped), inner:
        outer()
    with pytest.raises(KeyError), outer:
        raise KeyError("other errors pass")
    with pytest.raises(ForwardStopped):
        ForwardStop()()  # without its with block, a stop is an ordinary exception


def test_output_of_stops_there_and_returns_the_output(net) -> None:
    x = torch.randn(2, 4)
    out = output_of(net.block1, lambda: net(x))
    torch.testing.assert_close(out, net.block1.b.lin(net.block1.a.lin(net.block0.lin(x))))
    assert net.block2.calls == 0
    assert hook_count(net) == 0


def test_input_of_returns_args_and_kwargs_and_never_runs_the_module(net) -> None:
    x = torch.randn(2, 4)
    args, kwargs = input_of(net.block1.b, lambda: net(x))
    torch.testing.assert_close(args[0], net.block1.a.lin(net.block0.lin(x)))
    assert kwargs == {}
    assert net.block1.b.calls == 0 and net.block2.calls == 0
    assert hook_count(net) == 0


def test_helpers_raise_when_the_module_does_not_run(net) -> None:
    spare = Counting(4)
    with pytest.raises(RuntimeError, match="spare did not run"):
        output_of(spare, lambda: net(torch.randn(1, 4)), name="spare")
    with pytest.raises(RuntimeError, match="was not called"):
        input_of(spare, lambda: net(torch.randn(1, 4)))
    assert hook_count(net) == 0 and hook_count(spare) == 0


def test_nested_stops_pass_through_the_helpers(net) -> None:
    """A stop of an outer user raised before the helper's module passes through it (and its hook is removed)."""
    outer = ForwardStop()
    with HookSet() as hooks, outer:
        hooks.on_output(net.block0, lambda m, a, out: outer())
        output_of(net.block2, lambda: net(torch.randn(1, 4)))
        pytest.fail("the outer stop should have ended the forward")
    assert hook_count(net) == 0


def test_a_tap_bound_to_a_method_follows_a_deep_copy() -> None:
    class Owner(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Linear(2, 2)
            self.seen = 0
            tap_output(self.inner, self.count)

        def count(self, m, a, out) -> None:
            self.seen += 1

        def forward(self, x):
            return self.inner(x)

    owner = Owner()
    twin = copy.deepcopy(owner)
    twin(torch.randn(1, 2))
    assert (owner.seen, twin.seen) == (0, 1)
