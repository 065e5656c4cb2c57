"""Check a composed config against its schema dataclasses, and explain Hydra's override errors.

Hydra refuses ``training.max_step=10`` (no such key) but accepts ``+training.max_step=10``: the
``+`` adds the key beside the schema's fields and the run ignores it. ``unknown_keys`` walks the
composed OmegaConf tree, and wherever a node is typed by a dataclass (``OmegaConf.get_type``) it
compares the node's keys with the dataclass's fields; a dict-typed field (``training.inductor``)
is free-form and not checked. Each unknown key comes with the closest valid ones (difflib).

``explain_override_error`` turns the exception Hydra raises while composing into one line that
names the key and what it expects: ``training.max_steps must be an int, got 'abc'``.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing

from omegaconf import DictConfig, OmegaConf

from muongpt import MuonGPTError


def _fields(node: DictConfig) -> list[str] | None:
    """The field names of the dataclass typing ``node``, or None when it is not one."""
    kind = OmegaConf.get_type(node)
    if kind is None or not dataclasses.is_dataclass(kind):
        return None
    return [f.name for f in dataclasses.fields(kind)]


def suggest(key: str, valid: list[str]) -> str:
    """' (did you mean a or b?)' with the closest valid keys, or '' when none is close."""
    close = difflib.get_close_matches(key, valid, n=2, cutoff=0.6)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def unknown_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    """One message per key of ``cfg`` (recursively) that its schema dataclass does not define."""
    problems = []
    fields = _fields(cfg)
    for key in cfg:
        name = f"{prefix}{key}"
        if name == "hydra":  # Hydra's own node (return_hydra_config=True): Hydra checks it
            continue
        if fields is not None and key not in fields:
            problems.append(f"unknown key {name}{suggest(str(key), fields)}")
            continue
        child = cfg._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            problems += unknown_keys(child, prefix=f"{name}.")
    return problems


def check_config_keys(cfg: DictConfig) -> None:
    """Raise a one-line MuonGPTError naming every key the schemas do not know (hydra.* aside)."""
    problems = unknown_keys(cfg)
    if problems:
        raise MuonGPTError("; ".join(problems))


def _type_name(hint) -> str:
    """'an int', 'a number', 'true or false', 'a string', 'a list of numbers', ..."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (list, tuple):
        inner = _type_name(args[0]) if args else "values"
        for article in ("an ", "a "):
            inner = inner.removeprefix(article)
        plural = {"int": "ints", "number": "numbers", "string": "strings"}.get(inner, inner)
        return f"a list of {plural}"
    if origin is dict:
        return "a mapping {key: value}"
    names = {int: "an int", float: "a number", bool: "true or false", str: "a string"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def expected_type(object_type, key: str) -> str | None:
    """What the dataclass ``object_type`` declares for field ``key``, in words (None: unknown)."""
    if object_type is None or not dataclasses.is_dataclass(object_type):
        return None
    try:
        hints = typing.get_type_hints(object_type)
    except Exception:  # an annotation that does not resolve: fall back to Hydra's own words
        return None
    return _type_name(hints[key]) if key in hints else None


def explain_override_error(error: BaseException) -> str | None:
    """One line for an unknown key or a wrongly typed value in a Hydra composition error.

    None when the error is of another kind (a missing config group, a parse error, ...).
    """
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    cause = error.__cause__ or error
    full_key = getattr(cause, "full_key", None)
    object_type = getattr(cause, "object_type", None)
    if not full_key:
        return None
    key = str(full_key).rsplit(".", 1)[-1]
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and dataclasses.is_dataclass(
        object_type
    ):
        fields = [f.name for f in dataclasses.fields(object_type)]
        return f"unknown key {full_key}{suggest(key, fields)}"
    if isinstance(cause, ValidationError):
        wanted = expected_type(object_type, key)
        if wanted:
            return f"{full_key} must be {wanted}, got {getattr(cause, 'value', None)!r}"
    return None


# The keys people change most, one line each (`--help` of muongpt-train and muongpt bench).
MAIN_KEYS = (
    ("experiment=NAME", "a preset run (tiny: 4 layers on tiny Shakespeare, CPU, minutes)"),
    ("training.max_steps=N", "optimizer steps of the run"),
    ("training.device=auto|cpu|cuda", "where to train (auto: CUDA when available)"),
    ("training.batch_size=N", "sequences per optimizer step, over all GPUs"),
    ("training.micro_batch_size=N", "sequences per forward pass (accumulation fills the gap)"),
    ("training.seq_len=N", "tokens per sequence"),
    ("model=gpt|speedrun", "the core GPT or the speed-run variant (model/size=tiny|d12|...)"),
    ("training.resume=auto|PATH", "continue from the newest checkpoint of hydra.run.dir or PATH"),
    ("optimizer=muon|adamw|soap", "the optimizer; optimizer.lr=X sets its learning rate"),
    ("hydra.run.dir=PATH", "the run folder (default runs/<experiment>/<date_time>)"),
)


def config_groups() -> dict[str, list[str]]:
    """Each config group (folder of conf/, nested ones as model/gpt) and its options."""
    from muongpt.config import CONF_DIR

    groups = {}
    for folder in sorted(p for p in CONF_DIR.rglob("*") if p.is_dir()):
        options = sorted(f.stem for f in folder.glob("*.yaml"))
        if options:
            groups[folder.relative_to(CONF_DIR).as_posix()] = options
    return groups


def command_help(prog: str, about: str) -> str:
    """Short help: what the command does, the config groups and the main keys."""
    lines = [f"usage: {prog} [KEY=VALUE | GROUP=OPTION | +NEW_KEY=VALUE ...]", "", about, ""]
    lines.append("config groups (GROUP=OPTION):")
    groups = config_groups()
    width = max(len(g) for g in groups)
    lines += [f"  {g:<{width}}  {', '.join(opts)}" for g, opts in groups.items()]
    lines += ["", "keys people change most:"]
    width = max(len(k) for k, _ in MAIN_KEYS)
    lines += [f"  {key:<{width}}  {what}" for key, what in MAIN_KEYS]
    lines += [
        "",
        f"every key and its value: {prog} --cfg job   (Hydra's own flags: {prog} --hydra-help)",
    ]
    return "\n".join(lines)
