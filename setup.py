from setuptools import find_packages, setup

with open("README.md", encoding="utf-8") as f:
    long_description = f.read()

setup(
    name="bminf",
    version="3.0.0.dev0",
    description="Big pretrained Chinese language models (CPM-1, CPM-2, EVA) on the GPU you have",
    long_description=long_description,
    long_description_content_type="text/markdown",
    packages=find_packages(include=["bminf", "bminf.*"]),
    package_data={"bminf": ["py.typed"], "bminf.demo": ["README.md", "*/checkpoint.pt", "*/vocab.txt"]},
    python_requires=">=3.9",
    # torch is deliberately a floor, not a pin: install the build that matches your CUDA first.
    install_requires=[
        "torch>=2.1",
        "numpy",
        "jieba>=0.42",
        "sentencepiece>=0.1.99",
        "safetensors>=0.4",
        "tqdm",
        "requests",
        "filelock>=3.0",
    ],
    extras_require={
        "test": ["pytest>=7", "hypothesis>=6", "transformers>=4.40", "triton; platform_system == 'Linux'",
                 "fastapi>=0.100", "uvicorn>=0.23", "openai>=1.0"],
        "gpu": ["triton"],
        "server": ["fastapi>=0.100", "uvicorn>=0.23"],
    },
    entry_points={"console_scripts": ["bminf=bminf.cli:main"]},
)
