"""The training loop: config -> model + optimizer + loader -> steps -> metrics and checkpoints."""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from muongpt import MuonGPTError
from muongpt.config import TEXT_VAL_FRACTION, model_config
from muongpt.data.loader import TokenLoader
from muongpt.data.shards import open_shard, resolve_shards
from muongpt.data.tokenizer import EOT_TOKEN, decode, encode
from muongpt.kernels.converters import KernelsConfig, apply_converters
from muongpt.model import GPT, build_model
from muongpt.optim import build_optimizer
from muongpt.optim.distributed import distribute
from muongpt.optim.fsdp import fsdp_optimizer
from muongpt.train import checkpoint as ckpt
from muongpt.train import fsdp, resilience
from muongpt.train.distributed import (
    DistContext,
    all_reduce_mean,
    any_rank,
    init_distributed,
    shutdown,
)
from muongpt.train.runtime import keep_large_cpu_allocations
from muongpt.train.schedule import Schedule
from muongpt.train.sinks import make_sinks


def load_text_tokens(data: DictConfig) -> tuple[tuple[str, np.ndarray], tuple[str, np.ndarray]]:
    """Tokenize one text file (default: the shipped tiny Shakespeare); the tail is validation.
    Returns (name, tokens) of each split, named as the loader's errors should name them."""
    from muongpt.assets import TINY_SHAKESPEARE

    path = Path(data.text_path) if data.text_path else TINY_SHAKESPEARE
    if not path.is_file():
        raise MuonGPTError(f"data.text_path: file not found: {path}")
    val_fraction = TEXT_VAL_FRACTION if data.val_fraction is None else data.val_fraction
    if not 0.0 < val_fraction < 1.0:
        raise MuonGPTError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise MuonGPTError(f"data.text_path {path}: the file is empty, no text to train on")
    tokens = np.array([EOT_TOKEN] + encode(text), dtype=np.uint16)
    split = int(len(tokens) * (1.0 - val_fraction))
    name = f"data.text_path {path}"
    train = (f"{name} (training split)", tokens[:split])
    return train, (f"{name} (validation split)", tokens[split:])


def unigram_entropy(tokens: np.ndarray) -> float:
    """Entropy (nats) of the token frequency distribution: the loss of the best context-free model."""
    # Counted in chunks: a 100M-token shard is never copied whole to int64 (800 MB).
    counts = np.zeros(1 << 16, dtype=np.int64)
    for start in range(0, len(tokens), 1 << 24):
        counts += np.bincount(tokens[start : start + (1 << 24)], minlength=1 << 16)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def check_batch_config(t: DictConfig, world_size: int) -> int:
    """Return the number of gradient-accumulation micro-steps, or explain why the batch is impossible."""
    for name in (
        "seq_len",
        "batch_size",
        "micro_batch_size",
        "max_steps",
        "log_every",
        "eval_every",
    ):
        if t[name] < 1:
            raise MuonGPTError(f"training.{name} must be >= 1, got {t[name]}")
    per_step = t.micro_batch_size * world_size
    if t.batch_size % per_step:
        raise MuonGPTError(
            f"training.batch_size ({t.batch_size}) must be a multiple of micro_batch_size x world size "
            f"({t.micro_batch_size} x {world_size} = {per_step})"
        )
    return t.batch_size // per_step


COMPILE_MODES = ("model", "blocks")


def dotted_keys(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(dotted_keys(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def inductor_options(options) -> dict:
    """``training.inductor`` as a plain dict, every key checked against torch's own list. Nested
    keys are joined with dots (``+training.inductor.triton.cudagraphs=true`` is Hydra's nesting
    of torch's ``triton.cudagraphs``)."""
    options = dict(OmegaConf.to_container(options) if isinstance(options, DictConfig) else options)
    options = dotted_keys(options)
    known = set(torch._inductor.list_options())
    unknown = sorted(set(options) - known)
    if unknown:
        raise MuonGPTError(
            f"training.inductor: unknown torch._inductor option(s) {unknown} "
            "(see torch._inductor.list_options())"
        )
    return options


def compile_model(model: GPT, mode: str, options=None, dynamic: bool | None = None):
    """The callable the trainer runs: ``torch.compile`` of the whole model (one forward and one
    backward graph: gradients all appear at the end of backward), or of each block and the head
    on their own (``blocks``: a block's gradients are final, and the sharded optimizers start
    reducing them, while the blocks before it still run backward). ``dynamic``: as
    ``torch.compile``'s."""
    options = inductor_options(options or {}) or None
    if mode == "model":
        return torch.compile(model, options=options, dynamic=dynamic)
    if mode == "blocks":
        for block in model.blocks:
            block.compile(options=options, dynamic=dynamic)
        # logits, soft-cap and loss fused, as in "model"
        model.lm_head.compile(options=options, dynamic=dynamic)
        return model
    raise MuonGPTError(f"training.compile_mode must be one of {COMPILE_MODES}, got {mode!r}")


class Trainer:
    def __init__(self, cfg: DictConfig, run_dir: str | Path):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        t = cfg.training
        self.ctx: DistContext = init_distributed(t.device)
        self.device = self.ctx.device
        self.grad_accum = check_batch_config(t, self.ctx.world_size)
        self.tokens_per_step = t.batch_size * t.seq_len

        torch.manual_seed(t.seed)
        np.random.seed(t.seed)
        random.seed(t.seed)
        # CPU kernels are already deterministic for a fixed thread count (the resume tests check
        # bit-identical runs); torch.use_deterministic_algorithms would make CPU steps ~4x slower.
        if self.device.type == "cpu":
            keep_large_cpu_allocations()

        self.model_config = model_config(cfg.model)
        self.model: GPT = build_model(self.model_config)
        kernels = KernelsConfig(**OmegaConf.to_container(cfg.kernels))
        fsdp.check_supported(t, self.ctx.world_size, kernels.converters)
        apply_converters(self.model, kernels)
        self.fsdp = t.parallel == "fsdp"
        if self.fsdp:  # before the optimizer: fully_shard replaces the parameters by DTensors
            fsdp.shard_model(self.model, self.device, bf16=t.autocast_bf16)  # built on the CPU:
        self.model.to(self.device)  # under FSDP each rank moved only its shards to the device
        self.optimizer = build_optimizer(self.model, cfg.optimizer)
        if self.fsdp:
            self.optimizer = fsdp_optimizer(self.optimizer)
        elif self.ctx.world_size > 1:  # no DDP: the sharded optimizers reduce the gradients
            self.optimizer = distribute(self.optimizer, self.model)
        self.schedule = Schedule.of_model(cfg, self.model, self.ctx.world_size)
        # rows of several lengths (training's and evaluation's): one static graph each (after a
        # first change of shape, dynamo's automatic dynamic shapes would trace a symbolic one)
        lengths = {*self.schedule.row_length_starts(), t.seq_len}
        dynamic = False if len(lengths) > 1 else None
        self.forward = (
            compile_model(self.model, t.compile_mode, t.inductor, dynamic)
            if t.compile
            else self.model
        )
        self.use_bf16 = t.autocast_bf16 and self.device.type == "cuda"

        self.train_loader, self.val_sources, self.entropy = self._build_data()
        self.step, self.tokens_seen, self.train_seconds = 0, 0, 0.0
        self.last_step_tokens = 0  # tokens of the latest step (fewer in a batch or row ramp)
        self.metrics_file = self.run_dir / "metrics.jsonl"
        self.sinks = (
            make_sinks(
                cfg.logging, self.run_dir, run_config=OmegaConf.to_container(cfg, resolve=True)
            )
            if self.ctx.is_main
            else []
        )
        self.guard = resilience.NonFiniteGuard(t.max_bad_steps, self.ctx, log=self.log)
        self.preemption = resilience.PreemptionHandler()
        self.last_checkpoint_step: int | None = None
        self.last_save_time = time.monotonic()  # training.checkpoint_minutes counts from here
        self.resumed_from = self.resume(t.resume)  # keep last: it restores the RNG states

    # ---------------------------------------------------------------- setup
    def _build_data(self):
        data, t = self.cfg.data, self.cfg.training
        # a key the chosen source does not read is a mistake, not something to ignore silently
        unread = {"text": ["train_files", "val_files"], "shards": ["text_path", "val_fraction"]}
        for key in unread.get(data.source, []):
            if data[key] not in ("", None):
                raise MuonGPTError(
                    f"data.{key} is not read with data.source={data.source} (data={data.name}); "
                    "shards come from data=fineweb or data=bench, text from data=shakespeare"
                )
        if data.source == "text":
            train, val = load_text_tokens(data)
            train_sources, val_sources = [train], [val]
            entropy = unigram_entropy(train[1])
        elif data.source == "shards":
            if not data.train_files or not data.val_files:
                raise MuonGPTError("data.train_files and data.val_files must be set for shard data")
            train_sources = resolve_shards(data.train_files)
            val_sources = resolve_shards(data.val_files)
            # The first shard is a fair estimate; only the main rank prints it.
            entropy = unigram_entropy(open_shard(train_sources[0])) if self.ctx.is_main else None
        else:
            raise MuonGPTError(f"data.source must be 'text' or 'shards', got {data.source!r}")
        loader = TokenLoader(
            train_sources,
            t.micro_batch_size,
            t.seq_len,
            rank=self.ctx.rank,
            world_size=self.ctx.world_size,
            device=self.device,
            align_to_bos=data.align_to_bos,
            vocab_size=self.model_config.vocab_size,
        )
        return loader, val_sources, entropy

    def autocast(self):
        if self.use_bf16:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def log(self, message: str) -> None:
        if self.ctx.is_main:
            tqdm.write(message)
            logging.getLogger("muongpt.run").info(message)  # train.log, when Hydra set one up

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over the first eval_tokens of the validation data (fp32 sum)."""
        t = self.cfg.training
        loader = TokenLoader(
            self.val_sources,
            t.micro_batch_size,
            t.seq_len,
            rank=self.ctx.rank,
            world_size=self.ctx.world_size,
            device=self.device,
            epochs=1,
            prefetch=False,
            vocab_size=self.model_config.vocab_size,  # as training: an id past it is an error
        )
        n_batches = max(1, t.eval_tokens // loader.tokens_per_batch)
        self.model.eval()
        total = torch.zeros((), device=self.device, dtype=torch.float32)
        count = 0
        for inputs, targets in loader:
            with self.autocast():
                total += self.forward(inputs, targets).float()
            count += 1
            if count == n_batches:
                break
        self.model.train()
        if count == 0:
            raise MuonGPTError(
                "the validation data is shorter than one batch; lower seq_len or batch"
            )
        return float(all_reduce_mean(total / count, self.ctx))

    # ---------------------------------------------------------------- training
    def apply_schedule(self) -> int:
        """Set the coming step's lr, momentum, attention window, row length and tie; returns its
        micro-steps."""
        settings = self.schedule.at(self.step)
        self.optimizer.apply_schedule(settings.lr_scale, settings.momentum)
        self.train_loader.set_seq_len(settings.seq_len)
        if settings.attn_window is not None:
            self.model.set_attn_window(settings.attn_window)
        if settings.embed_head_tied is not None:
            if self.step == self.schedule.untie_step:  # the first step apart
                self.optimizer.untie(self.model.untie_weights())
            self.optimizer.tied = settings.embed_head_tied
        return settings.micro_steps

    def train_step(self, clock: StepClock | None = None) -> torch.Tensor:
        """One optimizer step over its micro-batches; returns the mean loss (on device).
        ``clock``: the seconds of its parts (``muongpt bench``'s split; synchronises)."""
        t = self.cfg.training
        accum = self.apply_schedule()
        loss_sum = torch.zeros((), device=self.device)
        if clock is not None:
            clock.start()
        for micro in range(accum):
            inputs, targets = next(self.train_loader)
            if clock is not None:
                clock.lap("data")
            with self.autocast():
                loss = self.forward(inputs, targets)
            if micro == accum - 1:  # sharded optimizers reduce grads during backward
                self.optimizer.reduce_during_next_backward()
            (loss / accum).backward()
            loss_sum += loss.detach().float()
            if clock is not None:
                clock.lap("forward_backward")
        mean_loss = loss_sum / accum
        if self.guard.observe(mean_loss, self.step + 1):  # False: a non-finite step to skip
            if t.grad_clip > 0:
                self.optimizer.clip_grad_norm_(t.grad_clip)  # of the mean grad over ranks
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if clock is not None:
            clock.lap("optimizer")
        self.step += 1
        self.last_step_tokens = accum * self.train_loader.tokens_per_batch
        self.tokens_seen += self.last_step_tokens
        return mean_loss

    def write_metrics(self, record: dict) -> None:
        if self.ctx.is_main:
            resilience.append_metrics(self.metrics_file, record)  # strict JSON, one line
            for sink in self.sinks:
                sink.log(record)

    def current_lr(self) -> float:
        return float(self.optimizer.optimizers[0].param_groups[0]["lr"])

    def run(self) -> dict:
        t = self.cfg.training
        self.preemption.install()  # SIGTERM/SIGINT: checkpoint at the next step boundary, exit
        self.log(
            f"model: {self.model.num_params():,} parameters "
            f"({self.model.num_params(non_embedding=True):,} without the embedding); "
            f"{self.model_config.n_layer} layers, {self.model_config.n_embd} wide, "
            f"{self.model_config.n_head} heads, model={self.model_config.name}, mixers "
            f"{list(self.model_config.mixing.pattern)}"
        )
        self.log(self.optimizer.summary())
        self.log(
            f"batch: {self.tokens_per_step:,} tokens/step = {t.batch_size} x {t.seq_len} "
            f"({self.grad_accum} micro-steps x {self.ctx.world_size} ranks); device {self.device}"
            + (
                f"; ramped from {t.batch_size_start} sequences over {t.batch_ramp_steps} steps"
                if t.batch_size_start
                else ""
            )
            + (
                f"; training rows of {list(t.seq_len_schedule)} tokens over equal parts of the run"
                if t.seq_len_schedule
                else ""
            )
        )
        warmup_seconds = 0.0
        if t.compile_warmup_steps > 0 and self.step == 0:
            warmup_seconds = compile_warmup(self, t.compile_warmup_steps)
        val_loss = float("nan")
        if self.step == 0:  # the untrained baseline, so every run shows how far val loss fell
            val_loss = self.evaluate()
            self.write_metrics({**self._record(None, None), "val_loss": val_loss})
            self.log(f"step 0: val loss {val_loss:.4f}")
        # made after the step-0 evaluation (its time is not in the ETA); closed on any exit, so an
        # error's one line is not printed into the bar's
        with tqdm(
            total=t.max_steps,
            initial=self.step,
            disable=not (t.progress_bar and self.ctx.is_main),
            unit="step",
            dynamic_ncols=True,
        ) as bar:
            window_start, window_tokens = time.perf_counter(), 0
            while self.step < t.max_steps:
                step_start = time.perf_counter()
                loss = self.train_step()
                if self.device.type == "cuda" and self.clock_read_at(self.step):
                    torch.cuda.synchronize()  # the clock stops when the GPU has finished the step
                self.train_seconds += time.perf_counter() - step_start
                window_tokens += self.last_step_tokens
                record = None
                if self.step % t.log_every == 0 or self.step == t.max_steps:
                    train_loss = float(all_reduce_mean(loss, self.ctx))
                    self.guard.check(self.step)  # a non-finite loss at any step so far stops here
                    tok_s = window_tokens / max(time.perf_counter() - window_start, 1e-9)
                    window_start, window_tokens = time.perf_counter(), 0
                    record = self._record(train_loss if math.isfinite(train_loss) else None, tok_s)
                    bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tok_s:,.0f}", refresh=False)
                if self.step % t.eval_every == 0 or self.step == t.max_steps:
                    self.guard.check(self.step)
                    val_loss = self.evaluate()
                    record = record or self._record(None, None)
                    record["val_loss"] = val_loss
                    self.log(f"step {self.step}: val loss {val_loss:.4f}")
                    window_start = time.perf_counter()  # evaluation time is not training throughput
                if record is not None:
                    self.write_metrics(record)
                last = self.step == t.max_steps  # the final checkpoint is saved after the loop
                if not last and self.checkpoint_due():
                    self.save_checkpoint()
                    window_start = time.perf_counter()  # saving is not training throughput
                bar.update(1)
                if not last and self.preemption.should_stop(self.ctx, self.step, t.log_every):
                    return self.interrupted()
        if math.isnan(val_loss):  # resumed from a checkpoint already at max_steps
            val_loss = self.evaluate()
        final = self.save_final()
        summary = {
            "steps": self.step,
            "tokens": self.tokens_seen,
            "train_seconds": round(self.train_seconds, 2),
            "warmup_seconds": round(warmup_seconds, 2),  # compilation, outside train_seconds
            "final_val_loss": val_loss,
            "unigram_entropy": self.entropy,
            "checkpoint": str(final) if final else None,
        }
        return summary

    def clock_read_at(self, step: int) -> bool:
        """True at the steps after which ``train_seconds`` is read (logged, evaluated, saved,
        or the last step, or a stop on a signal): there the GPU must have finished the step
        before the clock stops. Elsewhere the next step's launches overlap this one's work."""
        t = self.cfg.training
        return (
            step == t.max_steps
            or step % max(t.log_every, 1) == 0
            or step % max(t.eval_every, 1) == 0
            or (t.checkpoint_every > 0 and step % t.checkpoint_every == 0)
            or self.preemption.signum is not None
        )

    def checkpoint_due(self) -> bool:
        """A checkpoint at every ``checkpoint_every`` steps, and once ``checkpoint_minutes`` of
        wall time have passed since the last one (decided at log steps, by rank 0's clock, so
        that every rank takes part in the same save)."""
        t = self.cfg.training
        if not t.save_checkpoints:
            return False
        if t.checkpoint_every > 0 and self.step % t.checkpoint_every == 0:
            return True
        if t.checkpoint_minutes <= 0 or self.step % max(t.log_every, 1):
            return False
        due = time.monotonic() - self.last_save_time >= 60 * t.checkpoint_minutes
        return any_rank(due and self.ctx.is_main, self.ctx)

    def _record(self, train_loss: float | None, tok_s: float | None) -> dict:
        record = {
            "step": self.step,
            "tokens": self.tokens_seen,
            "lr": self.current_lr(),
            "elapsed_s": round(self.train_seconds, 3),
        }
        if train_loss is not None:
            record["train_loss"] = train_loss
            record["tokens_per_s"] = round(tok_s, 1)
        if self.device.type == "cuda":
            record["peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        return record

    # ---------------------------------------------------------------- checkpoints & samples
    def state_dict(self) -> dict:
        if self.fsdp:  # keyed by parameter name, DTensor shards
            sharded = fsdp.sharded_state(self.model, self.optimizer.optimizers)
        else:
            sharded = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}
        return {
            "format": ckpt.CHECKPOINT_FORMAT,
            **sharded,
            "loader": self.train_loader.state_dict(),
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "train_seconds": self.train_seconds,
            "rng": resilience.capture_rng_state(self.device),
            **self.guard.state_dict(),
            "config": OmegaConf.to_container(self.cfg, resolve=True),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a state_dict(): weights, optimizer, data position, counters, RNG states."""
        if state.get("sharded"):  # a .dcp checkpoint: read into this run's layout
            if self.ctx.world_size > 1 and not self.fsdp:
                raise MuonGPTError(
                    f"{state['sharded']}: a sharded checkpoint resumes with "
                    "training.parallel=fsdp or on one process"
                )
            fsdp.load_sharded(Path(state["sharded"]), self.model, self.optimizer.optimizers)
        elif self.fsdp:  # a single-process checkpoint: every rank keeps its shards of it
            fsdp.load_full(
                state, self.model_config, self.cfg.optimizer, self.model, self.optimizer.optimizers
            )
        else:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.train_loader.load_state_dict(state["loader"])
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.guard.load_state_dict(state)
        if "rng" in state:
            resilience.restore_rng_state(state["rng"], self.device)

    def resume(self, resume: str) -> Path | None:
        """Load what training.resume names (none | auto | a file | a run directory), if anything."""
        return resilience.resume_trainer(self, resume)

    def save_checkpoint(self) -> Path | None:
        """Save the full training state of this step (main rank); keep the newest K files. None
        with ``training.save_checkpoints=false``: nothing is written."""
        if not self.cfg.training.save_checkpoints:
            return None
        self.guard.check(self.step)  # never save a state that a non-finite loss has touched
        path = ckpt.checkpoint_path(self.run_dir, self.step)
        if self.fsdp:
            path = path.with_suffix(".dcp")
        if self.last_checkpoint_step == self.step:
            return path
        state = self.state_dict()  # with several ranks, a collective: gathers shards
        self.guard.check_state(state, self.step)  # the weights after this step's update
        if self.fsdp:  # every rank writes its shards
            fsdp.save_sharded(path, state, self.ctx.is_main)
        if self.ctx.is_main:
            if not self.fsdp:
                ckpt.save_checkpoint(path, state)
            ckpt.prune_checkpoints(self.run_dir, self.cfg.training.keep_checkpoints)
            self.log(f"checkpoint: {path}")
        self.guard.last_checkpoint, self.last_checkpoint_step = path, self.step
        self.last_save_time = time.monotonic()
        return path

    def save_final(self) -> Path | None:
        t = self.cfg.training
        path = self.save_checkpoint()
        weights = fsdp.full_model_state(self.model) if self.fsdp else None  # a collective
        if not self.ctx.is_main:
            return None
        if self.fsdp:  # rank 0 samples from a whole copy on the CPU
            self.sample_model = build_model(self.model_config)
            self.sample_model.load_state_dict(weights)
        if path is not None and t.export_safetensors:  # beside the final checkpoint
            meta = {
                "step": self.step,
                "tokens_seen": self.tokens_seen,
                "config": OmegaConf.to_container(self.cfg, resolve=True),
            }
            export = path.with_name(ckpt.EXPORT_NAME)
            ckpt.export_safetensors(weights or self.model.state_dict(), export, meta)
            self.log(f"weights only: {export}")
        return path

    def interrupted(self) -> dict:
        """After a SIGTERM/SIGINT: save this step and say how to continue."""
        path = self.save_checkpoint()
        then = (
            f"checkpoint {path}; continue with training.resume=auto hydra.run.dir={self.run_dir}"
            if path
            else "nothing saved (training.save_checkpoints=false)"
        )
        self.log(f"stopped by {self.preemption.name} after step {self.step}: {then}")
        return {
            "steps": self.step,
            "tokens": self.tokens_seen,
            "train_seconds": round(self.train_seconds, 2),
            "interrupted": self.preemption.name,
            "checkpoint": str(path) if path else None,
        }

    def sample(self) -> str:
        from muongpt.generate import generate_tokens

        t = self.cfg.training
        prompt = [EOT_TOKEN] + encode(t.sample_prompt)
        model = getattr(self, "sample_model", self.model)  # FSDP: the whole copy of save_final
        model.eval()
        new = list(
            generate_tokens(
                model,
                prompt,
                t.sample_tokens,
                temperature=t.sample_temperature,
                top_k=t.sample_top_k,
                seed=t.seed,
            )
        )
        self.model.train()
        return t.sample_prompt + decode(new)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.preemption.restore()
        resilience.release_run_dir(self)
        shutdown(self.ctx)


class StepClock:
    """Seconds per part of a training step ({part: seconds}, summed over micro-steps): each
    lap waits for the device, so a part's kernels are timed in it, not in the next."""

    def __init__(self, device: torch.device):
        self.device, self.seconds, self._last = device, {}, 0.0

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def start(self) -> None:
        self._last = self._now()

    def lap(self, part: str) -> None:
        now = self._now()
        self.seconds[part] = self.seconds.get(part, 0.0) + now - self._last
        self._last = now


# ---------------------------------------------------------------- compile warm-up (speed runs)
def compile_warmup(trainer: Trainer, steps: int) -> float:
    """Run ``steps`` training steps, then one at the first step of each later row length
    (``training.seq_len_schedule``), then undo them all; returns their wall seconds.

    The first steps of a compiled model compile (and autotune) its kernels, and each new row
    length compiles its own graph. Running them before the timed run and then restoring the
    initial weights, optimizer state and data position keeps compilation out of
    ``train_seconds`` without changing what the run computes.
    """
    import copy

    start = time.perf_counter()
    model_state = copy.deepcopy(trainer.model.state_dict())
    optim_state = copy.deepcopy(trainer.optimizer.state_dict())
    loader_state = trainer.train_loader.state_dict()
    for _ in range(steps):
        trainer.train_step()
    for first_step in list(trainer.schedule.row_length_starts().values())[1:]:
        trainer.step = first_step
        trainer.train_step()
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    trainer.model.load_state_dict(model_state)
    trainer.optimizer.load_state_dict(optim_state)
    trainer.train_loader.load_state_dict(loader_state)
    trainer.step, trainer.tokens_seen = 0, 0
    seconds = time.perf_counter() - start
    trainer.log(f"compile warm-up: {steps} steps in {seconds:.1f} s (undone)")
    return seconds
