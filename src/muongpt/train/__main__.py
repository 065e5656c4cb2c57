"""`muongpt-train` / `python -m muongpt.train`: the Hydra application that trains a GPT."""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from muongpt import MuonGPTError
from muongpt.config import CONF_DIR, register_configs

register_configs()


def run(cfg: DictConfig) -> dict:
    from muongpt.train.trainer import Trainer

    run_dir = HydraConfig.get().runtime.output_dir
    trainer = Trainer(cfg, run_dir)
    try:
        if trainer.ctx.is_main:
            (trainer.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
            print(f"run directory: {run_dir}")
        summary = trainer.run()
        if summary.get("interrupted"):  # stopped by SIGTERM/SIGINT after saving a checkpoint
            return summary
        if trainer.ctx.is_main:
            sample = trainer.sample()
            print("\n--- sample ---\n" + sample.strip() + "\n--------------")
            print(
                f"done: {summary['steps']} steps, {summary['tokens']:,} tokens in "
                f"{summary['train_seconds']:.1f} s of training\n"
                f"final val loss {summary['final_val_loss']:.4f} nats/token; "
                f"unigram entropy of the training tokens {summary['unigram_entropy']:.4f} nats/token"
            )
        return summary
    finally:
        trainer.close()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        summary = run(cfg)
    except MuonGPTError as e:
        print(f"error: {e}", file=sys.stderr)
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


def check_overrides(argv: list[str]) -> None:
    """Compose the config once before Hydra does, so a bad override is a one-line error.

    Sweeps (-m) and Hydra's own flags are left to Hydra, which reports them itself.
    """
    if any(arg.startswith("-") for arg in argv):
        return
    from hydra import compose, initialize_config_dir

    overrides = [a for a in argv if not a.lstrip("+~").startswith(("hydra.", "hydra/"))]
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            compose(config_name="config", overrides=overrides)
    except Exception as e:  # Hydra raises several types; all mean a bad config
        print(f"error: invalid config: {_one_line(e)}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    check_overrides(sys.argv[1:])
    _hydra_main()


if __name__ == "__main__":
    main()
