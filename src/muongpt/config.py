"""Structured config schemas, registered in Hydra's ConfigStore.

The yaml tree under ``muongpt/conf`` is merged onto these dataclasses, so a misspelled key or a
value of the wrong type is an error before anything runs. Groups: model (with model/gpt sizes),
mixing_layer, optimizer, data, training, experiment.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from muongpt.optim.config import OptimizerConfig
from muongpt.train.sinks import LoggingConfig

CONF_DIR = Path(__file__).resolve().parent / "conf"


@dataclass
class GPTSizeConfig:
    n_layer: int = MISSING
    n_head: int = MISSING
    n_embd: int = MISSING


@dataclass
class ModelConfig:
    gpt: GPTSizeConfig = field(default_factory=GPTSizeConfig)
    vocab_size: int = 50257
    mlp_ratio: int = 4
    rope_base: float = 10000.0
    logit_softcap: str = "none"  # none | tanh | sigmoid
    softcap_value: float = 15.0
    sigmoid_cap: list[float] = field(default_factory=lambda: [30.0, 7.5, 0.0])  # A, B, C
    fp8_head: bool = False
    fp8_scales: list[float] = field(default_factory=lambda: [2.0, 32.0, 2.0**29])  # x, W, grad
    fp8_dw: bool = False  # fp8 head: the weight gradient in fp8 too
    fp8_fused_loss: bool = False  # fp8 head: matmul + soft-cap + loss + gradient in one op
    fused_mlp: bool = False  # ReLU^2 in the MLP matmuls' Triton epilogues (CUDA, bf16)
    value_embeds: int = 0  # value-embedding tables, for the first and last n attention layers
    unet_skips: bool = False  # first-half block outputs added to second-half block inputs
    x0_mix: bool = False  # each block mixes in the embedding output: a x + b x0
    embed_norm: bool = False  # RMSNorm on the embedding output
    smear: bool = False  # token smear: a gated share of the previous token's embedding
    attn_gate: bool = False  # per-head sigmoid gate on attention outputs
    key_offset: bool = False  # long-window layers: unrotated key dims from the previous token
    residual_bf16: bool = False  # bf16 residual stream under bf16 autocast (default: fp32)
    bigram_embed: int = 0  # rows of a hashed (previous, current) token table added to every layer
    backout_after: int = 0  # subtract lambda * (stream after this many blocks) before the head
    mtp_weights: list[float] = field(default_factory=list)  # loss weights of targets t+2, t+3, ...
    rope_truncate: bool = False  # RoPE on half the head dims only (the rest position-free)
    attn_scale: float = 0.0  # attention softmax scale; 0 = 1/sqrt(head_dim)
    # per-layer fraction of model.attn_window, cycled over the depth
    window_pattern: list[float] = field(default_factory=lambda: [1.0])
    attention: str = "sdpa"  # sdpa (cuDNN/flash, causal) | flex (FlexAttention block masks)
    doc_mask: bool = False  # flex: attend within the document only (documents start at EOT)
    attn_window: int = 0  # flex: sliding window in tokens; 0 = full causal


@dataclass
class MixingLayerConfig:
    name: str = MISSING
    pattern: list[str] = field(default_factory=lambda: ["attention"])  # cycled over the layers
    pom_degree: int = 2
    pom_expand: int = 2
    pom_n_sel_heads: int = 1


@dataclass
class DataConfig:
    name: str = MISSING
    source: str = MISSING  # "text": one text file split into train/val; "shards": .bin files
    text_path: str = ""  # empty: the tiny-Shakespeare text shipped in the package
    val_fraction: float = 0.1  # held-out tail of the text
    train_files: str = ""  # glob, folder or file of .bin shards
    val_files: str = ""
    align_to_bos: bool = False


@dataclass
class TrainingConfig:
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda
    autocast_bf16: bool = True  # bf16 autocast on CUDA (CPU always runs fp32)
    compile: bool = False
    compile_mode: str = "model"  # model: one graph | blocks: each block + the head (overlap)
    # torch._inductor options for the compiled model, e.g. {coordinate_descent_tuning: true}
    inductor: dict[str, Any] = field(default_factory=dict)
    seq_len: int = 1024
    batch_size: int = 8  # sequences per optimizer step, over all ranks
    micro_batch_size: int = 8  # sequences per forward pass on one rank
    max_steps: int = 1000
    warmup_steps: int = 0
    cooldown_steps: int = 0
    final_lr_frac: float = 0.0
    grad_clip: float = 0.0  # 0 disables clipping
    eval_every: int = 100
    eval_tokens: int = 65536
    log_every: int = 10
    checkpoint_every: int = 0  # 0: only the final checkpoint
    keep_checkpoints: int = 2  # the newest K checkpoints are kept; 0 keeps all
    resume: str = "none"  # none | auto (newest in the run dir) | a checkpoint file or run dir
    export_safetensors: bool = True  # model.safetensors (weights only) beside the final checkpoint
    # Non-finite losses: 0 stops at the first (no per-step sync); N > 0 skips up to N steps
    # (their update is not applied), at the cost of one device->host sync per step.
    max_bad_steps: int = 0
    sample_tokens: int = 64
    sample_prompt: str = "\n"
    sample_temperature: float = 0.8
    sample_top_k: int = 50
    progress_bar: bool = True
    # Steps run (and then undone: weights, optimizer state, data position restored) before the
    # timed run, so compilation and autotuning stay out of train_seconds. 0: none.
    compile_warmup_steps: int = 0
    attn_window_start: int = 0  # flex: grow the window from this to model.attn_window (0: fixed)
    mtp_decay: list[float] = field(default_factory=list)  # run fraction where each mtp weight is 0
    batch_size_start: int = 0  # sequences per step at step 0, grown to batch_size (0: fixed)
    batch_ramp_steps: int = 0  # ... linearly over this many steps


@dataclass
class Config:
    experiment_name: str = MISSING
    model: ModelConfig = field(default_factory=ModelConfig)
    mixing_layer: MixingLayerConfig = field(default_factory=MixingLayerConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def register_configs() -> None:
    ConfigStore.instance().store(name="muongpt_schema", node=Config)
