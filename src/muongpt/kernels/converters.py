"""Kernel converters: swap a model's modules for faster kernels, from outside the model.

The model files define the math; a converter replaces a module by one that computes the same
function with another kernel (as torchtitan's float8 converter does), keeping every Parameter, so
checkpoints, optimizer groups and parameter names do not change. Chosen by name in
``kernels.converters``, applied in the order given, before the optimizer is built and before
``torch.compile``:

- ``flex_attention``: document/window masks as FlexAttention block masks (GPU) instead of dense
  SDPA masks; for ``model=speedrun``. On CPU (no FlexAttention backward) the dense form stays.
- ``compiled_block_lists``: after ``flex_attention``, the block masks' lists computed by a graph
  of their own (``model/masks.py``: about 60 small eager kernels per mask become a few fused ones).
- ``fp8_head``: the lm_head matmul in fp8 (e4m3 forward, e5m2 gradients, fp8 weight gradient).
- ``fp8_head_loss``: ``fp8_head`` whose training forward fuses matmul, soft-cap, loss and the
  logit gradient into one op (``kernels/fp8_loss.py``).
- ``fused_mlp``: ReLU^2 inside the Triton GEMM epilogues of every MLP (``kernels/relu2_mlp.py``).
- ``fused_pom``: every PoM mixer's pointwise middle (expansion, GELU, products, causal mean,
  gate) in Triton kernels, its matmuls in cuBLAS (``kernels/pom.py``).
- ``bf16_tables``: the speed-run model's value-embedding and bigram tables stored in bf16 (the
  dtype their lookups are used in under autocast), their gradients summed in fp32, so that their
  gradients, AdamW state and step move half the bytes (309M parameters at d12, every step;
  ``kernels/bf16_tables.py``). A storage dtype more than a kernel: it rounds the tables, so the
  run is not the fp32 run bit for bit.
- ``segmented_table_grads``: after ``bf16_tables``, those tables' gradients summed over the
  touched rows only (sorted ids, a segmented sum per chunk; ``kernels/bf16_tables.py``) instead
  of in a dense fp32 table rounded whole.

Where the hardware lacks a kernel (CPU, older GPUs) each converted module runs its plain path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from muongpt import MuonGPTError
from muongpt.model.gpt import GPT


@dataclass
class KernelsConfig:
    converters: list[str] = field(default_factory=list)  # names below, applied in order
    fp8_scales: list[float] = field(default_factory=lambda: [2.0, 32.0, 2.0**29])  # x, W, grad


def flex_attention(model: GPT, cfg: KernelsConfig) -> None:
    from muongpt.model.masks import flex_or_dense_mask

    if not hasattr(model, "mask_builder"):
        raise MuonGPTError(
            "kernels.converters: flex_attention needs a document-masked model (model=speedrun, or model.doc_mask=true)"
        )
    model.mask_builder = flex_or_dense_mask


def compiled_block_lists(model: GPT, cfg: KernelsConfig) -> None:
    from muongpt.model.masks import flex_or_dense_mask, flex_or_dense_mask_compiled_lists

    if getattr(model, "mask_builder", None) is not flex_or_dense_mask:
        raise MuonGPTError(
            "kernels.converters: compiled_block_lists comes after flex_attention in the list"
        )
    model.mask_builder = flex_or_dense_mask_compiled_lists


def fp8_head(model: GPT, cfg: KernelsConfig) -> None:
    from muongpt.kernels.fp8 import FP8Head

    model.lm_head = FP8Head(model.lm_head, tuple(cfg.fp8_scales))


def fp8_head_loss(model: GPT, cfg: KernelsConfig) -> None:
    from muongpt.kernels.fp8_loss import FP8LossHead

    model.lm_head = FP8LossHead(model.lm_head, tuple(cfg.fp8_scales))


def fp8_mlp(model: GPT, cfg: KernelsConfig) -> None:
    from muongpt.kernels.fp8_mlp import FP8MLP

    for block in model.blocks:
        if block.mlp is not None:  # the speed-run model's MLP-free layers
            block.mlp = FP8MLP(block.mlp)


def fused_mlp(model: GPT, cfg: KernelsConfig) -> None:
    from muongpt.kernels.relu2_mlp import FusedMLP

    for block in model.blocks:
        if block.mlp is not None:
            block.mlp = FusedMLP(block.mlp)


def fused_pom(model: GPT, cfg: KernelsConfig) -> None:
    from muongpt.kernels.pom import FusedPoM
    from muongpt.model.pom import PoM

    for block in model.blocks:
        if isinstance(block.mixer, PoM):
            block.mixer = FusedPoM(block.mixer)


def bf16_tables(model: GPT, cfg: KernelsConfig) -> None:
    from muongpt.kernels.bf16_tables import BF16Table

    value_embeds = getattr(model, "value_embeds", None) or []
    bigram = getattr(model, "bigram_embed", None)
    if not value_embeds and bigram is None:
        raise MuonGPTError(
            "kernels.converters: bf16_tables needs value-embedding or bigram tables "
            "(model=speedrun with model.value_embeds or model.bigram_rows > 0)"
        )
    for i, table in enumerate(value_embeds):
        value_embeds[i] = BF16Table(table)
    if bigram is not None:
        model.bigram_embed = BF16Table(bigram)


def segmented_table_grads(model: GPT, cfg: KernelsConfig) -> None:
    from muongpt.kernels.bf16_tables import BF16Table

    tables = [m for m in model.modules() if isinstance(m, BF16Table)]
    if not tables:
        raise MuonGPTError(
            "kernels.converters: segmented_table_grads comes after bf16_tables in the list"
        )
    for table in tables:
        table.segmented = True


CONVERTERS: dict[str, Callable[[GPT, KernelsConfig], None]] = {
    "flex_attention": flex_attention,
    "compiled_block_lists": compiled_block_lists,
    "fp8_head": fp8_head,
    "fp8_head_loss": fp8_head_loss,
    "fp8_mlp": fp8_mlp,
    "fused_mlp": fused_mlp,
    "fused_pom": fused_pom,
    "bf16_tables": bf16_tables,
    "segmented_table_grads": segmented_table_grads,
}


def check_converters(names) -> None:
    unknown = [n for n in names if n not in CONVERTERS]
    if unknown:
        raise MuonGPTError(
            f"kernels.converters: unknown {unknown}; choose from {sorted(CONVERTERS)}"
        )
    if "fp8_head" in names and "fp8_head_loss" in names:
        raise MuonGPTError("kernels.converters: fp8_head_loss already includes fp8_head")
    if "fp8_mlp" in names and "fused_mlp" in names:
        raise MuonGPTError(
            "kernels.converters: fp8_mlp and fused_mlp both replace the MLP; pick one"
        )


def apply_converters(model: GPT, cfg: KernelsConfig) -> GPT:
    """Convert ``model`` in place by each of ``cfg.converters``; returns it."""
    check_converters(cfg.converters)
    params = {id(p) for p in model.parameters()}
    for name in cfg.converters:
        CONVERTERS[name](model, cfg)
    if {id(p) for p in model.parameters()} != params:  # a converter must keep every Parameter
        raise AssertionError("a kernel converter replaced a model parameter")
    return model
