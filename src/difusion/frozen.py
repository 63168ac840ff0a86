"""A U-Net compiled for CPU inference: Inductor's freezing, with every linear layer in oneDNN.

Freezing folds the weights into the graph as constants and prepacks them once: convolutions
for oneDNN with their activations fused, linear layers for MKL's packed sgemm in float32 and
oneDNN in bf16. On the SD 1.5 U-Net's shapes oneDNN's packed inner product is 1.18x faster
than MKL's in float32 too (`bench/linear_kernels.py`), so one more freezing pattern moves
the float32 linear layers onto it, for the U-Nets compiled here only.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator

import torch

from .nn import cpu_attention

_gate = threading.local()  # .onednn_linear: set while compile_frozen's graphs compile here


@contextlib.contextmanager
def _onednn_linear_in_this_thread() -> Iterator[None]:
    """Inductor compiles a graph in the thread that calls it: a compilation of someone
    else's in another thread meanwhile keeps its own choice."""
    _gate.onednn_linear = True
    try:
        yield
    finally:
        _gate.onednn_linear = False


@functools.cache
def _register_onednn_linear() -> None:
    from torch._inductor.fx_passes.freezing_patterns import register_freezing_graph_pattern
    from torch._inductor.pattern_matcher import Arg, CallFunction

    # Inductor packs linear layers in pass 1; this pattern runs after, in pass 2, and the
    # weight reorder it adds is folded into a constant with the rest
    @register_freezing_graph_pattern(
        CallFunction(torch.ops.mkl._mkl_linear, Arg(), Arg(), Arg(), Arg(), Arg()),
        extra_check=lambda match: getattr(_gate, "onednn_linear", False),
        pass_number=2,
    )
    def mkl_to_onednn(match, x, mkl_packed, weight, bias, batch_size):
        graph, mkl_linear = match.graph, match.output_node()
        with graph.inserting_before(mkl_linear):
            packed = graph.call_function(
                torch.ops.mkldnn._reorder_linear_weight, (weight, batch_size)
            )
            linear = graph.call_function(
                torch.ops.mkldnn._linear_pointwise.default, (x, packed, bias, "none", [], "")
            )
        linear.meta.update(mkl_linear.meta)
        mkl_linear.replace_all_uses_with(linear)
        graph.erase_node(mkl_linear)


def compile_frozen(unet: torch.nn.Module) -> None:
    """torch.compile `unet` in place for CPU inference with Inductor's freezing (weights folded
    in as constants, convolutions and linear layers prepacked for oneDNN with their
    activations fused); bf16 and f32 weights keep the attention kernel, loaded before tracing."""
    cpu_attention.load_for(unet)
    if torch._C.has_mkl and torch.backends.mkldnn.is_available():
        _register_onednn_linear()
    compiled = torch.compile(unet._call_impl)  # as nn.Module.compile does

    def frozen(*args, **kwargs):
        # Inductor reads `freezing` when a call compiles: given as torch.compile's option it
        # is not seen there, and the weights stay graph inputs, unpacked
        with _onednn_linear_in_this_thread(), torch._inductor.config.patch(freezing=True):
            return compiled(*args, **kwargs)

    unet._compiled_call_impl = frozen
