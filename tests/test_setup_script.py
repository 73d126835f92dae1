"""scripts/setup.sh installs torch 2.13.0 from PyPI (on Linux the CUDA build) unless TORCH_INDEX_URL names another
index, e.g. PyTorch's CPU one; a torch already in .venv is kept. Run against a stand-in .venv/bin/python that
records what it is asked to do."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def run_setup(tmp_path: Path, has_torch: bool, **env) -> list[str]:
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    (tmp_path / "benchmarks" / ".peers-env").mkdir(parents=True)
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    log = tmp_path / "calls.log"
    python.write_text(
        "#!/usr/bin/env bash\n"
        f'echo "$*" >> {log}\n'
        f'if [ "$*" = "-c import torch" ]; then exit {0 if has_torch else 1}; fi\n'
    )
    python.chmod(0o755)
    subprocess.run(
        ["bash", str(tmp_path / "scripts" / "setup.sh")],
        check=True,
        capture_output=True,
        env={"PATH": os.environ["PATH"], **env},
    )
    return log.read_text().splitlines()


def torch_installs(calls: list[str]) -> list[str]:
    return [call for call in calls if call.startswith("-m pip install") and "torch==" in call]


@pytest.mark.parametrize(("env", "expected"), [({}, ""), ({"TORCH_INDEX_URL": CPU_INDEX}, f" --index-url {CPU_INDEX}")])
def test_torch_comes_from_the_index_named(tmp_path, env, expected):
    assert torch_installs(run_setup(tmp_path, has_torch=False, **env)) == [
        f"-m pip install --quiet torch==2.13.0{expected}"
    ]


def test_a_torch_already_installed_is_kept(tmp_path):
    calls = run_setup(tmp_path, has_torch=True, TORCH_INDEX_URL=CPU_INDEX)
    assert torch_installs(calls) == [] and any("-e .[test]" in call for call in calls)
