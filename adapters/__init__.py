"""Adapters: blocks from real codebases turned into well-posed DEQ blocks ``f(z, x) -> z``.

Every adapter takes the user's module by reference and returns an ``nn.Module`` with ``forward(z, x)`` and
``initial_state(x)`` (an :class:`implicit.Block`), so that ``implicit.make_implicit(adapter(module), **options)`` is
the DEQ with every engine option. ``adapt(module, **adapter_options)`` finds the adapter from the module's type.
"""

from .conv import ConvBlock, conv_block, mdeq_block
from .hrnet import HRNetStageBlock, hrnet_stage_block
from .raft import RaftInjection, RaftState, RaftUpdateBlock, prepare_injection, raft_update_block, upsample_flow
from .registry import adapt, register_adapter, supported
from .transformer import TransformerBlock, TransformerInput, transformer_block, transformer_input

__all__ = [
    "ConvBlock",
    "HRNetStageBlock",
    "RaftInjection",
    "RaftState",
    "RaftUpdateBlock",
    "TransformerBlock",
    "TransformerInput",
    "adapt",
    "conv_block",
    "hrnet_stage_block",
    "mdeq_block",
    "prepare_injection",
    "raft_update_block",
    "register_adapter",
    "supported",
    "transformer_block",
    "transformer_input",
    "upsample_flow",
]
