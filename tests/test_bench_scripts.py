"""The device-call scripts of benchmarks/: valid bash, and runs of earlier code (name@ARCHIVE)
unpacked where the run expects them."""

import shutil
import subprocess
import tarfile
import uuid
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.sh")))
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", str(BENCH / script)], check=True)


def code_root(name: str, cwd: Path) -> str:
    """device_setup.sh's code_root, sourced alone (the rest of the file needs a GPU machine)."""
    text = (BENCH / "device_setup.sh").read_text()
    function = text[text.index("code_root() {") :]
    out = subprocess.run(
        ["bash", "-c", f'{function}\ncode_root "$1"', "_", name],
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
