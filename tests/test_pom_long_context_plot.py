"""benchmarks/pom_long_context_plot.py on written results: the time-to-loss table."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "pom_long_context_plot.py"


def write_run(folder: Path, name: str, curve: list, final: float) -> None:
    """A benchmarks/speedrun.py result: ``curve`` as (step, seconds, loss rounded to 4 places)."""
    result = {"val_loss": final, "train_seconds": curve[-1][1], "val_loss_curve": curve}
    (folder / f"{name}.json").write_text(json.dumps(result))


def test_every_run_reaches_the_target_and_times_interpolate(tmp_path):
    write_run(tmp_path, "attention_T8192", [[0, 0.0, 10.0], [25, 10.0, 6.0], [50, 20.0, 5.0]], 5.0)
    # the worst run: its final loss a hair under the rounded last point of its curve
    write_run(tmp_path, "pom_T8192", [[0, 0.0, 10.0], [25, 4.0, 7.0], [50, 8.0, 5.5]], 5.49996)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--results", str(tmp_path), "--out", str(tmp_path / "p.png")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    rows = {
        line.split("|")[2].strip(): line for line in proc.stdout.splitlines()[2:] if "|" in line
    }
    # target 5.5: attention passes it halfway between 6.0 (10 s) and 5.0 (20 s)
    assert rows["attention"].rstrip(" |").endswith("| 5.500 | 15")
    assert rows["pom"].rstrip(" |").endswith("| 5.500 | 8")
    assert (tmp_path / "p.png").stat().st_size > 0 and (tmp_path / "p.md").is_file()
