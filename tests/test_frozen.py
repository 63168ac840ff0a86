"""compile_frozen: Inductor's freezing with the float32 linear layers in oneDNN, and nothing
changed for the other compilations of the process."""

import pytest
import torch
import torch.nn.functional as F
from torch._inductor.utils import run_and_get_code

from difusion.frozen import compile_frozen

pytestmark = pytest.mark.skipif(
    not (torch._C.has_mkl and torch.backends.mkldnn.is_available()),
    reason="MKL and oneDNN: the CPU build's linear kernels",
)


class Block(torch.nn.Module):
    """A feed-forward block: linear layers on (batch, tokens, channels), as attention's."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = torch.nn.Linear(32, 96), torch.nn.Linear(96, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.gelu(self.up(x)))


def compiled_code(block: Block, x: torch.Tensor) -> tuple[torch.Tensor, str]:
    torch._dynamo.reset()
    with torch.no_grad():
        out, code = run_and_get_code(block, x)
    return out, "".join(code)


def test_linear_layers_run_in_onednn_and_match_eager():
    torch.manual_seed(0)
    block, x = Block().eval(), torch.randn(2, 50, 32)
    with torch.no_grad():
        eager = block(x)
    compile_frozen(block)
    out, code = compiled_code(block, x)
    assert "mkldnn._linear_pointwise" in code and "_mkl_linear" not in code
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)


def test_other_frozen_compilations_keep_inductors_choice():
    """The pattern is registered for the process but acts only inside compile_frozen: a
    user's own freezing compilation still gets MKL's packed linear layers."""
    torch.manual_seed(0)
    compile_frozen(Block().eval())  # registers the pattern
    block, x = Block().eval(), torch.randn(2, 50, 32)
    block.compile()
    with torch._inductor.config.patch(freezing=True):
        _, code = compiled_code(block, x)
    assert "_mkl_linear" in code and "mkldnn._linear_pointwise" not in code


def test_a_compilation_in_another_thread_meanwhile_keeps_inductors_choice():
    """While one of ours compiles (the gate held in this thread), a user's own frozen
    compilation in another thread still gets MKL's packed linear layers."""
    from concurrent.futures import ThreadPoolExecutor

    from difusion.frozen import _onednn_linear_in_this_thread

    torch.manual_seed(0)
    compile_frozen(Block().eval())  # registers the pattern
    block, x = Block().eval(), torch.randn(2, 50, 32)
    block.compile()

    def users_compilation() -> str:
        with torch._inductor.config.patch(freezing=True):
            return compiled_code(block, x)[1]

    with _onednn_linear_in_this_thread(), ThreadPoolExecutor(1) as pool:
        code = pool.submit(users_compilation).result()
    assert "_mkl_linear" in code and "mkldnn._linear_pointwise" not in code
