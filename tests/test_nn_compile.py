"""compile_blocks: compiled Blocks equal the eager ones, and a failing backend falls back."""

from __future__ import annotations

import warnings

import pytest
import torch

from mmssl.nn import Transformer
from mmssl.nn.compile import CompiledForward, compile_blocks, uncompile_blocks


def _stack() -> Transformer:
    torch.manual_seed(0)
    return Transformer(32, 2, 4, causal=True)


def test_compiled_blocks_match_eager_forward_and_grads() -> None:
    eager, compiled = _stack(), _stack()
    assert compile_blocks(compiled, backend="aot_eager") == 2
    x = torch.randn(2, 7, 32)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y1, y2 = eager(x1), compiled(x2)
    torch.testing.assert_close(y2, y1)
    y1.square().sum().backward()
    y2.square().sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad)
    for (n1, p1), (n2, p2) in zip(eager.named_parameters(), compiled.named_parameters()):
        assert n1 == n2
        torch.testing.assert_close(p2.grad, p1.grad)
    assert list(compiled.state_dict()) == list(eager.state_dict())


def test_the_one_row_last_block_adds_no_compiled_graph() -> None:
    """A pooled-only call's last block (`rows`) runs eagerly: its own graphs doubled the
    graphs every Block shares under dynamo's recompile limit, past which dynamo runs new
    shapes eagerly anyway.  Its rows are still those of the compiled full output."""
    graphs: list[torch.fx.GraphModule] = []

    def counting(gm: torch.fx.GraphModule, inputs: list[torch.Tensor]):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()  # Block.forward's graphs of earlier tests are not counted
    compiled = _stack()
    compile_blocks(compiled, backend=counting)
    x = torch.randn(2, 5, 32)
    full = compiled(x)
    before = len(graphs)
    assert before > 0
    rows = torch.tensor([4, 2])
    got = compiled(x, rows=rows)
    assert len(graphs) == before
    torch.testing.assert_close(got[:, 0], full[torch.arange(2), rows])


def test_failing_backend_falls_back_to_eager_with_one_warning() -> None:
    def broken(gm: torch.fx.GraphModule, inputs: list[torch.Tensor]):
        raise RuntimeError("no compiler here")

    eager, compiled = _stack(), _stack()
    compile_blocks(compiled, backend=broken)
    x = torch.randn(2, 5, 32)
    with pytest.warns(RuntimeWarning, match="running them eagerly") as caught:
        out = compiled(x)
        compiled(x)
    assert len(caught) == 1  # the first block's failure switches the whole stack to eager
    torch.testing.assert_close(out, eager(x))
    assert all(b.forward.failed for b in compiled.blocks)


def test_a_backward_that_fails_to_compile_falls_back_too() -> None:
    """aot_autograd compiled the backward lazily, inside loss.backward(): a failure there
    stopped the step instead of falling back.  It compiles with the forward now."""
    from torch._dynamo.backends.common import aot_autograd

    def no_backward(gm: torch.fx.GraphModule, inputs: list[torch.Tensor]):
        raise RuntimeError("no compiler for the backward")

    torch._dynamo.reset()
    eager, compiled = _stack(), _stack()
    compile_blocks(
        compiled,
        backend=aot_autograd(fw_compiler=lambda gm, _: gm.forward, bw_compiler=no_backward),
    )
    x = torch.randn(2, 5, 32)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    with pytest.warns(RuntimeWarning, match="running them eagerly"):
        out = compiled(x2)
    out.square().sum().backward()
    eager(x1).square().sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad)
    import torch._functorch.config as functorch_config

    assert functorch_config.force_non_lazy_backward_lowering is False  # set for the call only


def test_model_errors_are_not_swallowed() -> None:
    compiled = _stack()
    compile_blocks(compiled, backend="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "falling back" warning for the model's own error
        with pytest.raises(RuntimeError):
            compiled(torch.randn(2, 5, 31))  # wrong dim
    assert all(b.forward.failed is None for b in compiled.blocks)


def test_uncompile_restores_eager_forward() -> None:
    t = _stack()
    compile_blocks(t, backend="eager")
    assert isinstance(t.blocks[0].forward, CompiledForward)
    assert uncompile_blocks(t) == 2
    assert not isinstance(t.blocks[0].forward, CompiledForward)


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="unknown torch.compile backend 'nope'"):
        compile_blocks(_stack(), backend="nope")
    with pytest.raises(ValueError, match="contains no mmssl Block"):
        compile_blocks(torch.nn.Linear(2, 2))


def test_deepcopy_of_a_compiled_stack_runs_its_own_weights() -> None:
    # A copy (fine-tuning copy, EMA teacher) must compute with the copy's parameters, as the
    # same copy of the eager stack does, and leave the original alone.
    import copy

    eager, compiled = _stack(), _stack()
    compile_blocks(compiled, backend="eager")
    x = torch.randn(2, 5, 32)
    before = compiled(x).detach()
    eager_copy, compiled_copy = copy.deepcopy(eager), copy.deepcopy(compiled)
    for stack in (eager_copy, compiled_copy):
        with torch.no_grad():
            for p in stack.parameters():
                p.mul_(0.5).add_(0.1)
    assert all(isinstance(b.forward, CompiledForward) for b in compiled_copy.blocks)
    torch.testing.assert_close(compiled_copy(x), eager_copy(x))
    torch.testing.assert_close(compiled(x), before)
    # one fallback per copied model, still shared by its blocks
    fallbacks = {id(b.forward.fallback) for b in compiled_copy.blocks}
    assert len(fallbacks) == 1 and fallbacks != {id(compiled.blocks[0].forward.fallback)}
