"""`muongpt-train` / `python -m muongpt.train`: the Hydra application that trains a GPT."""

from __future__ import annotations

import logging
import re
import shutil
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from muongpt import MuonGPTError
from muongpt.config import CONF_DIR, register_configs
from muongpt.train.distributed import (
    agree_on_startup,
    broadcast_parameters,
    env_rank,
    env_world_size,
)

register_configs()

TRAIN_HELP = """\
Train a GPT: compose the Hydra config, write runs/<experiment>/<time>/ (config.yaml,
metrics.jsonl, train.log, checkpoints/, model.safetensors, report.md) and print a sample.
Arguments are Hydra overrides, e.g.  muongpt-train experiment=tiny training.max_steps=50"""


# Messages of the run also go to Hydra's log file (<run_dir>/train.log), not only to the console.
LOG = logging.getLogger("muongpt.run")
# What Hydra puts in a run folder before the run writes anything of its own.
HYDRA_FILES = {".hydra", "train.log", "config.yaml"}
# Folders above the run folder that did not exist before this process (check_overrides finds
# them): removed with a failed run's folder when nothing else is in them.
_NEW_PARENTS: list[Path] = []


def log_to_hydra_file() -> None:
    """Send LOG records to the file handlers Hydra gave the root logger, not to its console."""
    LOG.setLevel(logging.INFO)
    LOG.propagate = False  # the console already shows them (printed or tqdm.write)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and handler not in LOG.handlers:
            LOG.addHandler(handler)


def say(message: str) -> None:
    """Print a message and keep it in train.log."""
    print(message)
    LOG.info(message)


def remove_if_empty(run_dir: str | Path) -> bool:
    """Remove a run folder that holds nothing but Hydra's files (a run that failed before step
    1 leaves nothing worth keeping); True when removed."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or not {p.name for p in run_dir.iterdir()} <= HYDRA_FILES:
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    for parent in _NEW_PARENTS:  # innermost first; stops at one that holds anything
        try:
            parent.rmdir()
        except OSError:
            break
    return not run_dir.exists()


def run(cfg: DictConfig) -> dict:
    from muongpt.train.config_keys import check_config_keys

    run_dir = HydraConfig.get().runtime.output_dir
    log_to_hydra_file()
    steps_done = [0]
    try:
        check_config_keys(cfg)  # again here: sweeps (-m) skip check_overrides
        return _train(cfg, run_dir, steps_done)
    except BaseException:
        if env_rank() == 0 and steps_done[0] == 0:
            remove_if_empty(run_dir)
        raise


def _train(cfg: DictConfig, run_dir: str, steps_done: list[int]) -> dict:
    """Build the trainer, train, sample and write the run's summary and report."""
    import time

    from muongpt.cli.report import run_facts, write_report, write_summary
    from muongpt.train.trainer import Trainer

    started = time.time()
    trainer, error = None, None
    try:
        trainer = Trainer(cfg, run_dir)
    except Exception as e:  # under torchrun every rank must hear of it, or the others would hang
        error = e
    agree_on_startup(OmegaConf.to_container(cfg, resolve=True), error)  # raises on every rank
    broadcast_parameters(trainer.model)
    try:
        if trainer.ctx.is_main:
            from muongpt import atomic_write  # a full disk: one line

            text = OmegaConf.to_yaml(cfg, resolve=True)
            atomic_write(trainer.run_dir / "config.yaml", lambda tmp: tmp.write_text(text))
            say(f"run directory: {run_dir}")
        try:
            summary = trainer.run()
        finally:
            steps_done[0] = trainer.step
        if summary.get("interrupted"):  # stopped by SIGTERM/SIGINT after saving a checkpoint
            return summary
        if trainer.ctx.is_main:
            sample = trainer.sample()
            say("\n--- sample ---\n" + sample.strip() + "\n--------------")
            say(
                f"done: {summary['steps']} steps, {summary['tokens']:,} tokens in "
                f"{summary['train_seconds']:.1f} s of training\n"
                f"final val loss {summary['final_val_loss']:.4f} nats/token; "
                f"unigram entropy of the training tokens {summary['unigram_entropy']:.4f} nats/token"
            )
            try:
                facts = run_facts(trainer, HydraConfig.get().overrides.task, sys.argv, started)
                write_summary(trainer.run_dir, {**summary, **facts, "sample": sample})
                say(f"report: {write_report(trainer.run_dir)}")
            except Exception as e:  # the run itself succeeded: a report problem must not fail it
                say(
                    f"warning: report.md not written ({type(e).__name__}: {e}); retry with "
                    f"`muongpt report {trainer.run_dir}`"
                )
        return summary
    finally:
        trainer.close()


def report(error: MuonGPTError) -> None:
    """One line on stderr; under torchrun, an error every rank shares is printed by rank 0 only."""
    rank = env_rank()
    if rank != 0 and getattr(error, "reported_by_rank0", False):
        return
    where = f" (rank {rank})" if rank != 0 else ""
    print(f"error{where}: {error}", file=sys.stderr)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        summary = run(cfg)
    except MuonGPTError as e:
        report(e)
        sys.exit(2)
    if summary.get("interrupted"):
        from muongpt.train.resilience import EXIT_INTERRUPTED

        sys.exit(EXIT_INTERRUPTED)  # 75: a checkpoint was saved; rerun with training.resume=auto


def _one_line(error: Exception) -> str:
    """Hydra's composition errors span several lines; keep what names the problem."""
    noise = ("Set the environment variable HYDRA_FULL_ERROR", "Config search path", "provider=")
    lines = [ln.strip() for ln in str(error).splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith(noise)]
    return " ".join(lines) or type(error).__name__


def check_overrides(argv: list[str]) -> list[str]:
    """Compose the config once before Hydra does, so a bad override, an unknown key (even one
    added with ``+``) or a run folder that cannot be created is a one-line error, and no run
    folder is made for it. Returns the overrides to run with: ``training.resume=auto`` without a
    ``hydra.run.dir`` gets the folder of the newest unfinished run of the experiment.

    Sweeps (-m) and Hydra's own flags are left to Hydra, which reports them itself.
    """
    if any(arg.startswith("-") for arg in argv):
        return argv
    from hydra import compose, initialize_config_dir
    from hydra.core.utils import setup_globals

    from muongpt.cli import probe_dir
    from muongpt.train.config_keys import check_config_keys, explain_override_error

    def fail(message: str) -> None:
        if env_rank() == 0:  # every rank composes the same overrides: one message is enough
            print(f"error: {message}", file=sys.stderr)
        sys.exit(2)

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=argv, return_hydra_config=True)
    except Exception as e:  # Hydra raises several types; all mean a bad config
        fail(explain_override_error(e) or f"invalid config: {_one_line(e)}")
    try:
        check_config_keys(cfg)
        setup_globals()  # the ${now:...} resolver of the default run folder
        run_dir = Path(str(cfg.hydra.run.dir)).absolute()
        given = any(a.lstrip("+").startswith("hydra.run.dir=") for a in argv)
        if str(cfg.training.resume) == "auto" and not given:
            run_dir = newest_unfinished_run(run_dir.parent, cfg.experiment_name)
            if env_rank() == 0:
                print(f"resuming the newest unfinished run of {cfg.experiment_name}: {run_dir}")
            argv = [*argv, f"hydra.run.dir={_hydra_value(str(run_dir))}"]
        if env_rank() == 0:
            _NEW_PARENTS[:] = [p for p in run_dir.parents if not p.exists()]
            probe_dir(run_dir, "hydra.run.dir")
    except MuonGPTError as e:
        fail(str(e))
    check_fresh_run_dir(argv, str(cfg.training.resume))
    return argv


def newest_unfinished_run(runs: Path, experiment: str) -> Path:
    """The run folder under ``runs`` with the newest checkpoint among the runs that did not
    finish (no summary.json): what ``training.resume=auto`` continues without a hydra.run.dir."""
    from muongpt.train.checkpoint import list_checkpoints

    found = []
    for folder in sorted(runs.iterdir()) if runs.is_dir() else []:
        saved = list_checkpoints(folder) if folder.is_dir() else []
        if saved and not (folder / "summary.json").exists():
            found.append((saved[-1].stat().st_mtime, folder))
    if not found:
        raise MuonGPTError(
            f"training.resume=auto: no unfinished run of {experiment} with a checkpoint in "
            f"{runs}; name one with hydra.run.dir=RUN_FOLDER (or training.resume=CHECKPOINT)"
        )
    return max(found)[1]


def check_fresh_run_dir(argv: list[str], resume: str) -> None:
    """A fresh run into another run's ``hydra.run.dir`` stops before Hydra writes .hydra/ there."""
    given = [a.split("=", 1)[1] for a in argv if a.lstrip("+").startswith("hydra.run.dir=")]
    if not given or resume not in ("", "none") or env_rank() != 0:
        return
    from pathlib import Path

    from muongpt.train.resilience import refuse_fresh_run_over

    run_dir = Path(given[-1].strip("'\""))
    try:
        refuse_fresh_run_over(run_dir, run_dir / "metrics.jsonl")
    except MuonGPTError as e:
        report(e)
        sys.exit(2)


def _hydra_value(value: str) -> str:
    """``value`` as a Hydra override value (quoted unless it is a plain path)."""
    if re.fullmatch(r"[\w./-]+", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def distributed_overrides(argv: list[str]) -> list[str]:
    """Under torchrun: start the process group and give every rank rank 0's run directory.

    Each rank would otherwise resolve ``hydra.run.dir`` (``${now:...}``) itself and could get a
    directory of its own. Rank 0 resolves it, broadcasts it, and every rank runs with it as an
    explicit ``hydra.run.dir``; the other ranks write no ``.hydra/`` files and no log file there.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.utils import setup_globals

    from muongpt.train.distributed import broadcast_object, init_distributed

    if any(a in ("-m", "--multirun") for a in argv):
        report(MuonGPTError("sweeps (-m) cannot run under torchrun; start one torchrun per run"))
        sys.exit(2)
    if any(a.startswith("-") for a in argv):
        return argv  # --help, --cfg, ...: Hydra answers them without running
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=argv, return_hydra_config=True)
    try:
        init_distributed(cfg.training.device)
    except MuonGPTError as e:
        report(e)
        sys.exit(2)
    run_dir = None
    if env_rank() == 0:
        setup_globals()  # the ${now:...} resolver
        try:
            run_dir = str(cfg.hydra.run.dir)
        except Exception as e:
            run_dir = MuonGPTError(
                f"hydra.run.dir could not be resolved before the run ({_one_line(e)}); "
                "give hydra.run.dir=PATH explicitly"
            )
    run_dir = broadcast_object(run_dir)
    if isinstance(run_dir, MuonGPTError):
        run_dir.reported_by_rank0 = True
        report(run_dir)
        sys.exit(2)
    ours = {"hydra.run.dir": _hydra_value(run_dir)}
    if env_rank() != 0:  # rank 0 alone writes .hydra/ and the log file
        ours.update({"hydra.output_subdir": "null", "hydra/job_logging": "none"})
    argv = [a for a in argv if a.lstrip("+~").split("=", 1)[0] not in ours]
    return argv + [f"{key}={value}" for key, value in ours.items()]


def main() -> None:
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        from muongpt.train.config_keys import command_help

        print(command_help("muongpt-train", TRAIN_HELP))
        return
    sys.argv[1:] = check_overrides(sys.argv[1:])
    if env_world_size() > 1:
        sys.argv[1:] = distributed_overrides(sys.argv[1:])
    _hydra_main()


if __name__ == "__main__":
    main()
