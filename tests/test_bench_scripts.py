"""The device-call scripts of benchmarks/: valid bash, runs of earlier code (name@ARCHIVE)
unpacked where the run expects them, speedrun.py's JSON on the CPU, profile_step.py's idle
report."""

import gc
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import uuid
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.sh")))
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", str(BENCH / script)], check=True)


def device_function(name: str) -> str:
    """One shell function of device_setup.sh, to run alone (the rest of the file needs a GPU
    machine): its text from ``name() {`` to its closing brace."""
    text = (BENCH / "device_setup.sh").read_text()
    start = text.index(f"{name}() {{")
    return text[start : text.index("\n}\n", start) + 3]


def code_root(name: str, cwd: Path) -> str:
    """device_setup.sh's code_root."""
    out = subprocess.run(
        ["bash", "-c", f'{device_function("code_root")}code_root "$1"', "_", name],
        cwd=cwd, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return out.stdout.strip()


def test_a_run_of_earlier_code_gets_its_unpacked_archive(tmp_path):
    stamp = f"v{uuid.uuid4().hex[:8]}"
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "marker.py").write_text("OLD = True\n")
    with tarfile.open(tmp_path / f"{stamp}.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "src", arcname="src")
    root = Path(code_root(f"prev_s2@{stamp}.tar.gz", tmp_path))
    try:
        assert root == Path("/tmp/versions") / stamp
        assert (root / "src" / "marker.py").read_text() == "OLD = True\n"
        (root / "src" / "marker.py").write_text("kept\n")  # unpacked once, not again
        assert code_root(f"again@{stamp}.tar.gz", tmp_path) == str(root)
        assert (root / "src" / "marker.py").read_text() == "kept\n"
        assert code_root("base_s2", tmp_path) == str(tmp_path)  # this checkout
    finally:
        shutil.rmtree(root, ignore_errors=True)
    with pytest.raises(subprocess.CalledProcessError):
        code_root(f"x@missing_{stamp}.tar.gz", tmp_path)
    assert not list(Path("/tmp/versions").glob(f"missing_{stamp}*"))  # nothing half unpacked


def test_speedrun_script_writes_the_fields_the_summaries_read(tmp_path):
    """benchmarks/speedrun.py end to end on the CPU (a tiny speed-run model, three steps): the
    JSON the device scripts' summaries read, and the run's checkpoint left unwritten."""
    import json
    import math
    import sys

    out = tmp_path / "r.json"
    tiny = [
        "model=speedrun", "model.n_layer=4", "model.n_head=2", "model.n_embd=64",
        "model.value_embeds=1", "model.backout_after=2", "model.bigram_rows=1000",
        "data=shakespeare", "training.device=cpu", "training.compile=false",
        "training.max_steps=3", "training.seq_len=128", "training.batch_size=2",
        "training.micro_batch_size=2", "training.eval_tokens=256", "training.eval_every=3",
        "training.progress_bar=false",
    ]  # fmt: skip
    run = subprocess.run(
        [sys.executable, str(BENCH / "speedrun.py"), "--name", "tiny", "--out", str(out), *tiny],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    r = json.loads(out.read_text())
    assert r["name"] == "tiny" and r["steps"] == 3 and r["device"] == "cpu"
    assert math.isfinite(r["val_loss"]) and r["train_seconds"] > 0 and r["tokens_per_s"] > 0
    assert r["mfu"] is None and r["peak_mem_gib"] is None  # no GPU: no peak to divide by
    assert [step for step, _ in r["train_loss_curve"]][-1] == 3
    assert "RESULT tiny: val" in run.stdout
    assert "checkpoint:" not in run.stdout + run.stderr  # training.save_checkpoints=false
    # the wall time's parts: no compile warm-up here, two evaluations (steps 0 and 3)
    assert r["build_seconds"] > 0 and r["warmup_seconds"] == 0.0 and r["eval_seconds"] > 0
    parts = r["build_seconds"] + r["eval_seconds"] + r["train_seconds"]
    assert parts <= r["wall_seconds_total"] + 0.05
    assert f"evaluations {r['eval_seconds']:.1f} s" in run.stdout


def load_profile_step():
    spec = importlib.util.spec_from_file_location("profile_step", BENCH / "profile_step.py")
    profile_step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(profile_step)
    return profile_step


def test_profile_idle_report_counts_overlapping_gpu_events_once(tmp_path):
    """profile_step.py's idle report: busy is the union of the GPU events (two overlapping
    kernels count once), idle the rest of the span, gaps listed largest first."""
    profile_step = load_profile_step()
    events = [  # microseconds: [0, 10] and [5, 20] overlap, then gaps of 10 and 25
        {"cat": "kernel", "name": "a", "ts": 0, "dur": 10},
        {"cat": "kernel", "name": "b", "ts": 5, "dur": 15},
        {"cat": "gpu_memcpy", "name": "copy", "ts": 30, "dur": 10},
        {"cat": "kernel", "name": "c", "ts": 65, "dur": 5},
        {"cat": "cpu_op", "name": "host", "ts": 0, "dur": 100},
    ]
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"traceEvents": events}))
    text, busy_ms = profile_step.idle_report(trace)
    assert busy_ms == pytest.approx(0.035)
    assert text.splitlines()[0].startswith("GPU span 0.1 ms, busy 0.0 ms (50.0%), idle 0.0 ms in 2")
    gaps = [line.split()[0] for line in text.splitlines()[2:]]
    assert gaps == ["25", "10"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_host_lead_grows_while_the_gpu_is_behind_and_stays_zero_when_a_step_waits():
    """profile_step.py's host lead: steps that queue about 20 ms of GPU sleep and return at once
    leave the host about one step further ahead at each start; steps that read a device value
    wait for the GPU, which then waits for the host at every start."""
    profile_step = load_profile_step()
    x = torch.ones(1, device="cuda")

    def queued():
        torch.cuda._sleep(40_000_000)  # tens of ms at any clock; launched in microseconds

    ms, leads = profile_step.host_leads_ms(queued, steps=5)
    assert abs(leads[0]) < 1.0 and ms > 5
    for i in range(1, 5):  # about i steps of GPU time ahead (the launches take microseconds)
        assert abs(leads[i] - i * ms) < 0.2 * i * ms + 1.0, (i, leads, ms)

    def reads():
        queued()
        x.sum().item()

    ms, leads = profile_step.host_leads_ms(reads, steps=4)
    assert all(abs(lead) < 1.0 for lead in leads), leads


def test_gc_pauses_counts_the_collections_inside_its_block_only():
    """profile_step.py's garbage-collector report: collections made inside the block are
    counted by generation with their pauses; none after it (its callback is removed)."""
    profile_step = load_profile_step()

    def cycles(n: int) -> None:
        for _ in range(n):
            a: list = []
            a.append(a)  # a reference cycle: only the cyclic collector frees it

    gc.collect()
    with profile_step.gc_pauses() as report:
        cycles(5000)
        gc.collect()  # one full collection, generation 2
    assert report["collections"][2] >= 1
    assert 0 < report["max_ms"] <= report["total_ms"]
    before = list(report["collections"])
    gc.collect()
    assert report["collections"] == before


def test_profile_idle_report_names_the_host_op_that_kept_the_gpu_waiting(tmp_path):
    """Without Python stacks: a gap whose next kernel was launched after the GPU ran dry names
    the innermost op around the launch, and the host op the launching thread spent the gap in
    (the innermost covering at least half of it), not the other thread's."""
    profile_step = load_profile_step()
    events = [  # the GPU is idle from 10 to 110 us; the kernel after the gap launched at 100
        {"cat": "kernel", "name": "a", "ts": 0, "dur": 10},
        {"cat": "kernel", "name": "b", "ts": 110, "dur": 10, "args": {"correlation": 7}},
        {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 100, "dur": 2, "tid": 1,
         "args": {"correlation": 7}},
        {"cat": "cpu_op", "name": "ProfilerStep", "ts": 0, "dur": 200, "tid": 1},
        {"cat": "user_annotation", "name": "Optimizer.step#NorMuon.step", "ts": 5, "dur": 90,
         "tid": 1},
        {"cat": "cpu_op", "name": "aten::stack", "ts": 20, "dur": 30, "tid": 1},
        {"cat": "cpu_op", "name": "Torch-Compiled Region: 0/0", "ts": 98, "dur": 50, "tid": 1},
        {"cat": "cpu_op", "name": "aten::copy_", "ts": 10, "dur": 88, "tid": 2},  # loader thread
    ]  # fmt: skip
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"traceEvents": events}))
    text, _ = profile_step.idle_report(trace)
    gap = text.splitlines()[2]
    assert gap.split()[:2] == ["100", "90"]
    assert "<- Torch-Compiled Region: 0/0" in gap
    assert gap.endswith("[Optimizer.step#NorMuon.step 85 us]")


def test_check_runs_drops_the_runs_a_trainer_would_refuse():
    """benchmarks/check_runs.py builds each run's model, optimizer and schedule (meta device)
    and names the runs refused at start-up; --filter keeps the others (and runs of earlier code,
    which this code cannot judge) in speed_runs.sh's RUNS format."""
    runs = (
        "r370|training.seed=3 training.max_steps=370 optimizer.momentum_cooldown_steps=8 "
        "optimizer.momentum=0.95 optimizer.momentum_warmup_steps=600;"
        "every2|optimizer.embed_head_every=2;"  # refused with the tied head
        "long_cd|training.max_steps=370 optimizer.momentum_cooldown_steps=371;"  # more than 370
        "typo|training.max_step=3;"
        "old@.devold/v0.tar.gz|training.seed=2"
    )
    script = [sys.executable, str(BENCH / "check_runs.py"), "--runs", runs]
    checked = subprocess.run(script, capture_output=True, text=True)
    assert checked.returncode == 1, checked.stderr
    lines = checked.stdout.splitlines()
    # 0.85 + 0.1 * 369/600 = 0.9115 from the warm-up, then the cooldown's 0.85 + 0.1/8 at step 369
    assert lines[0] == (
        "ok   r370: 370 steps, last step lr x0.105, momentum 0.8625, rows of 65536; "
        "4 parameter groups"
    )
    assert lines[1].startswith("FAIL every2: optimizer.embed_head_every > 1 with a tied")
    assert lines[2].startswith("FAIL long_cd: optimizer.momentum_cooldown_steps must be in")
    assert lines[3].startswith("FAIL typo: unknown key training.max_step")
    assert lines[4] == "skip old@.devold/v0.tar.gz: earlier code, not checked"
    kept = subprocess.run([*script, "--filter"], capture_output=True, text=True, check=True)
    assert kept.stdout.strip() == (
        "r370|training.seed=3 training.max_steps=370 optimizer.momentum_cooldown_steps=8 "
        "optimizer.momentum=0.95 optimizer.momentum_warmup_steps=600;"
        "old@.devold/v0.tar.gz|training.seed=2"
    )


def checked_runs(flag: str, runs: str, cwd: Path) -> subprocess.CompletedProcess:
    """device_setup.sh's checked_runs, with this interpreter as python3."""
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "PYTHONPATH": str(BENCH.parent / "src"),
    }
    return subprocess.run(
        ["bash", "-c", f'{device_function("checked_runs")}checked_runs "$1" "$2"', "_", flag, runs],
        cwd=cwd, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip


def test_device_calls_drop_refused_runs_and_keep_all_when_the_check_fails(tmp_path):
    runs = "a|training.seed=2;every2|optimizer.embed_head_every=2"
    kept = checked_runs("--runs", runs, cwd=BENCH.parent)
    assert kept.stdout.strip() == "a|training.seed=2"
    assert "FAIL every2: optimizer.embed_head_every > 1 with a tied" in kept.stderr
    jobs = "a|run|training.seed=2;b|bench|bench.steps=3;every2|run|optimizer.embed_head_every=2"
    kept = checked_runs("--jobs", jobs, cwd=BENCH.parent)
    assert kept.stdout.strip() == "a|run|training.seed=2;b|bench|bench.steps=3"
    broken = checked_runs("--runs", runs, cwd=tmp_path)  # no benchmarks/check_runs.py here
    assert broken.stdout.strip() == runs and "every run goes ahead unchecked" in broken.stderr


TIMING_VARIABLES = ("CALL_LIMIT", "RUN_ESTIMATE", "RESERVE", "RUN_TIMEOUT")


def call_timing_function(call: str, seconds: int, **env: str) -> subprocess.CompletedProcess:
    """``call`` (a device_setup.sh function and its arguments) run ``seconds`` into a device
    call, with only the timing variables given in ``env`` set."""
    script = f"{device_function(call.split()[0])}SECONDS={seconds}; {call}"
    env = {**{k: v for k, v in os.environ.items() if k not in TIMING_VARIABLES}, **env}
    return subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True)


def test_a_device_call_starts_no_run_that_its_time_limit_would_cut_off():
    """device_setup.sh's run_fits: a run starts only while SECONDS + RUN_ESTIMATE + RESERVE is
    within CALL_LIMIT, so speed_runs.sh leaves time to pack what finished."""

    def fits(seconds: int, **env: str) -> bool:
        return call_timing_function("run_fits", seconds, **env).returncode == 0

    assert fits(0) and fits(445)  # 445 + 100 + 40 = 585
    assert not fits(446)
    assert fits(300, CALL_LIMIT="440") and not fits(301, CALL_LIMIT="440")
    assert not fits(300, RUN_ESTIMATE="300") and fits(300, RUN_ESTIMATE="200", RESERVE="0")


def test_a_run_longer_than_estimated_is_stopped_before_the_call_limit():
    """device_setup.sh's run_limit: a run's timeout is RUN_TIMEOUT (or the given default) but
    ends RESERVE seconds before CALL_LIMIT, so the call still packs what finished."""

    def limit(seconds: int, default: int = 400, **env: str) -> int:
        return int(call_timing_function(f"run_limit {default}", seconds, **env).stdout)

    assert limit(0) == 400 and limit(145) == 400  # 585 - 40 - 145 = 400
    assert limit(445) == 100 and limit(146) == 399
    assert limit(0, RUN_TIMEOUT="330") == 330 and limit(300, RUN_TIMEOUT="330") == 245
    assert limit(300, CALL_LIMIT="440", RESERVE="0") == 140
