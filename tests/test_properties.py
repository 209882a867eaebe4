"""Property-based tests (hypothesis, derandomized and bounded for CI): torchgc.checkpoint on random
small layer stacks gives exactly the gradients of the same stack without checkpointing.

Stacks mix tuple and bare-tensor outputs, tensor keyword arguments, frozen layers, parameter-free
blocks and dropout; every strategy, reentrant or not, with and without prefetch. CPU, fp32: the
same kernels run in the same order, so every comparison is bitwise."""

import copy
import warnings

import torch
from hypothesis import given
from hypothesis import strategies as st

import torchgc

WIDTH = 8


class Block(torch.nn.Module):
    """One layer of a generated stack."""

    def __init__(self, kind: str, returns_tuple: bool, takes_scale: bool):
        super().__init__()
        self.kind, self.returns_tuple, self.takes_scale = kind, returns_tuple, takes_scale
        if kind != "parameter-free":
            self.linear = torch.nn.Linear(WIDTH, WIDTH)
        self.dropout = torch.nn.Dropout(0.3) if kind == "dropout" else torch.nn.Identity()

    def forward(self, x, scale=None):
        h = torch.tanh(self.linear(x)) if self.kind != "parameter-free" else torch.sigmoid(x) * torch.tanh(x) + x
        h = self.dropout(h)
        if scale is not None:
            h = h * scale
        return (h, h.detach().sum()) if self.returns_tuple else h


block_specs = st.tuples(
    st.sampled_from(["linear", "parameter-free", "dropout"]),
    st.booleans(),  # frozen
    st.booleans(),  # returns a tuple
    st.booleans(),  # takes the scale keyword tensor
)


@st.composite
def stacks(draw):
    specs = draw(st.lists(block_specs, min_size=1, max_size=4))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    blocks = torch.nn.ModuleList()
    for kind, frozen, returns_tuple, takes_scale in specs:
        block = Block(kind, returns_tuple, takes_scale)
        block.requires_grad_(not frozen)
        blocks.append(block)
    rows = draw(st.integers(1, 5))
    return blocks, rows, draw(st.booleans())  # the input requires grad


def run(blocks, x, scale, checkpoint_options):
    """Forward and backward through the stack; returns the loss, every gradient and x's."""
    torch.manual_seed(1234)  # dropout masks: the same draws in both runs
    h = x * 1.0
    for block in blocks:
        kwargs = {"scale": scale} if block.takes_scale else {}
        if checkpoint_options is None:
            out = block(h, **kwargs)
        else:
            out = torchgc.checkpoint(block, h, **kwargs, **checkpoint_options)
        h = out[0] if block.returns_tuple else out
    loss = (h * torch.arange(1.0, WIDTH + 1)).square().sum()
    if loss.requires_grad:
        loss.backward()
    grads = [p.grad for p in blocks.parameters()] + [x.grad, scale.grad]
    return loss.detach(), grads


@given(stack=stacks(), strategy=st.sampled_from(["checkpoint", "offload", "auto"]), use_reentrant=st.booleans(),
       prefetch=st.booleans(), only_trainable=st.booleans())
def test_random_stacks_get_the_gradients_of_no_checkpointing(stack, strategy, use_reentrant, prefetch, only_trainable):
    blocks, rows, input_requires_grad = stack
    options = dict(strategy=strategy, use_reentrant=use_reentrant, prefetch=prefetch, only_trainable=only_trainable, min_offload_bytes=0)

    def inputs():
        gen = torch.Generator().manual_seed(7)
        x = torch.randn(rows, WIDTH, generator=gen).requires_grad_(input_requires_grad)
        return x, torch.rand(WIDTH, generator=gen).add_(0.5).requires_grad_(True)

    reference = run(copy.deepcopy(blocks), *inputs(), None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reentrant fallback's warning, where no input requires grad
        result = run(copy.deepcopy(blocks), *inputs(), options)
    assert torch.equal(reference[0], result[0])
    assert len(reference[1]) == len(result[1])
    for expected, got in zip(reference[1], result[1]):
        assert (expected is None) == (got is None)
        if expected is not None:
            assert torch.equal(expected, got)
