"""What the multi-GPU benchmarks share: a worker's composed config, and one torchrun launch of a
worker script that writes its result as JSON."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def compose_config(overrides: list[str]):
    """The config of ``experiment=speedrun_d12`` with ``overrides`` (Hydra's compose API)."""
    from hydra import compose, initialize_config_dir

    from muongpt.config import CONF_DIR, register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=["experiment=speedrun_d12", *overrides])


def run_workers(
    script: str | Path, nproc: int, argv: list[str], timeout_s: float, env: dict | None = None
) -> tuple[dict | None, str]:
    """``torchrun --standalone --nproc_per_node=N script --worker ARGV --result=FILE`` in a
    process group of its own (a timeout kills every rank); ``env`` adds defaults to the
    environment. Returns (the result JSON with ``wall_s`` added, "") or (None, the error:
    "timeout", or the tail of the output, which is also printed)."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            str(Path(script).resolve()),
            "--worker",
            *argv,
            f"--result={result}",
        ]
        full_env = {"OMP_NUM_THREADS": "1", **(env or {}), **os.environ}
        start = time.perf_counter()
        proc = subprocess.Popen(
            cmd,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            stdout, stderr = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return None, "timeout"
        if proc.returncode != 0 or not result.is_file():
            tail = (stderr or stdout)[-1500:]
            print(tail, file=sys.stderr)
            return None, tail[-300:]
        out = json.loads(result.read_text())
        out["wall_s"] = round(time.perf_counter() - start, 1)
        return out, ""
