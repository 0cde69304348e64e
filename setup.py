"""PeRL install. On CPU machines install torch==2.13.0 first (scripts/setup_env.sh does it) so that
no resolver pulls a CUDA torch; GPU users add the `gpu` extra."""

from setuptools import find_packages, setup

setup(
    name="perl-rlvr",
    version="0.1.0",
    description="Parameter-efficient RL with verifiable rewards: 12 PEFT methods under DAPO, on verl",
    packages=find_packages(include=["perl", "perl.*"]),
    package_data={"perl.verl_glue": ["config/*.yaml"]},  # the verl entry point's DAPO base config
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
        "gpu": ["vllm>=0.10", "flash-attn"],
        "test": ["pytest>=8"],
    },
    entry_points={"console_scripts": ["perl=perl.cli:main"]},
)
