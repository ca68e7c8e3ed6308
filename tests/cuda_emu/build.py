"""Builds the CUDA kernels of csrc/cuda for the CPU emulator in emu.h / emu.cpp, as a Python module.

`build(out_dir)` copies every csrc/cuda/*.cu to out_dir as a .cpp that includes emu.h first, with each launch
`kernel<...><<<grid, block[, smem[, stream]]>>>(args)` rewritten to `emu_launch(grid, block, smem, stream, kernel<...>,
args)`, writes a pybind11 binding exposing the same ive::cuda launchers as csrc/bindings.cpp's `cuda` submodule,
compiles the translation units in parallel with the host C++ compiler and links `_cuda_emu`. The result is cached in
out_dir under a hash of every input (sources, headers, this script, compiler and flags), so a test session that
calls build() several times compiles once.

Needs a C++20 compiler (g++ >= 11 or clang++; $CXX overrides) and the CUDA toolkit's headers, found from $CUDA_HOME /
$CUDA_PATH or from nvcc's own dry run (the same way setup.py finds nvcc's library folders); no GPU, no libcudart.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CSRC = ROOT / "csrc"
MODULE = "_cuda_emu"
# -fno-strict-aliasing: the kernels type-pun through reinterpret_cast (uint4 <-> T[] in common.cuh load16/store16),
# which CUDA device compilers accept; g++ -O2 would otherwise drop those stores.
CXX_FLAGS = ["-std=c++20", "-O2", "-fPIC", "-pthread", "-fvisibility=hidden", "-fno-strict-aliasing"]
JOBS = 2


def find_cxx() -> str | None:
    return shutil.which(os.environ.get("CXX") or "g++") or shutil.which("c++") or shutil.which("clang++")


def find_nvcc() -> str | None:
    if os.environ.get("NVCC"):
        return os.environ["NVCC"]
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [shutil.which("nvcc")] + ([str(Path(home) / "bin" / "nvcc")] if home else [])
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def find_cuda_include() -> str | None:
    """The folder holding cuda_runtime.h, or None."""
    candidates = []
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        candidates += [Path(home) / "include", *sorted((Path(home) / "targets").glob("*/include"))]
    nvcc = find_nvcc()
    if nvcc:
        try:
            out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                                 capture_output=True, text=True, timeout=60).stderr
        except (OSError, subprocess.SubprocessError):
            out = ""
        line = next((l for l in out.splitlines() if "INCLUDES=" in l and "SYSTEM_INCLUDES" not in l), "")
        candidates += [Path(d) for d in re.findall(r'-I"?([^"\s]+)', line)]
        candidates.append(Path(nvcc).resolve().parent.parent / "include")
    return next((str(c.resolve()) for c in candidates if (c / "cuda_runtime.h").is_file()), None)


# ---- source rewriting ----

def _kernel_start(src: str, end: int) -> int:
    """Start of the kernel expression that ends at `end` (just before `<<<`): an optionally qualified name with
    optional (nested) template arguments."""
    i = end
    while i > 0 and src[i - 1].isspace():
        i -= 1
    if i > 0 and src[i - 1] == ">":  # template arguments: match the angle brackets backwards
        depth = 0
        while i > 0:
            i -= 1
            depth += {">": 1, "<": -1}.get(src[i], 0)
            if depth == 0:
                break
        if depth:
            raise ValueError("unbalanced template arguments before <<<")
        while i > 0 and src[i - 1].isspace():
            i -= 1
    j = i
    while j > 0 and (src[j - 1].isalnum() or src[j - 1] in "_:"):
        j -= 1
    if j == i:
        raise ValueError("no kernel name before <<<")
    return j


def _split_top_level(text: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur).strip())
    return parts


def rewrite_launches(src: str, name: str = "<source>") -> tuple[str, int]:
    """(source with every `kernel<<<cfg>>>(` replaced by `emu_launch(grid, block, smem, stream, kernel, `, count)."""
    out, pos, count = [], 0, 0
    for m in re.finditer(r"<<<(.*?)>>>\s*\(", src, flags=re.S):
        if m.start() < pos:
            continue
        start = _kernel_start(src, m.start())
        kernel = src[start:m.start()].strip()
        cfg = _split_top_level(m.group(1))
        if not 2 <= len(cfg) <= 4 or not all(cfg):
            raise ValueError(f"{name}: cannot parse the launch configuration <<<{m.group(1)}>>>")
        cfg += ["0", "0"][: 4 - len(cfg)]
        no_args = re.match(r"\s*\)", src[m.end():]) is not None
        newlines = "\n" * m.group(0).count("\n")  # keep line numbers (the #line directive maps them to the .cu)
        out += [src[pos:start], f"emu_launch({', '.join(cfg)}, {kernel}", "" if no_args else ", ", newlines]
        pos = m.end()
        count += 1
    out.append(src[pos:])
    text = "".join(out)
    if "<<<" in text:
        line = text[: text.index("<<<")].count("\n") + 1
        raise ValueError(f"{name}:{line}: a kernel launch `<<<` was not rewritten")
    return text, count


def cuda_bindings() -> list[str]:
    """The launcher names of csrc/bindings.cpp's `cuda` submodule (cuda.def("x", &ive::cuda::x))."""
    names = re.findall(r'\bcuda\.def\("(\w+)",\s*&ive::cuda::(\w+)\)', (CSRC / "bindings.cpp").read_text())
    if not names or any(a != b for a, b in names):
        raise RuntimeError("could not read the ive::cuda launchers from csrc/bindings.cpp")
    return [a for a, _ in names]


def _binding_source(names: list[str]) -> str:
    defs = "\n".join(f'  m.def("{n}", &ive::cuda::{n});' for n in names)
    return ("// Generated by tests/cuda_emu/build.py: csrc/cuda launchers compiled for the CPU emulator.\n"
            "#include <pybind11/pybind11.h>\n\n#include \"ops.h\"\n\n"
            f"PYBIND11_MODULE({MODULE}, m) {{\n"
            '  m.doc() = "csrc/cuda kernels run by the CPU CUDA emulator (tests/cuda_emu); stream argument ignored";\n'
            f"{defs}\n}}\n")


# ---- build ----

def _include_dirs(out_dir: Path, cuda_include: str) -> list[str]:
    import pybind11

    return [str(out_dir), str(HERE), str(CSRC), cuda_include, pybind11.get_include(),
            sysconfig.get_paths()["include"]]


def _fingerprint(cxx: str, cuda_include: str) -> str:
    h = hashlib.sha256()
    files = [p for pattern in ("cuda/*.cu", "cuda/*.cuh", "*.h", "*.cuh") for p in sorted(CSRC.glob(pattern))]
    files += [CSRC / "bindings.cpp", HERE / "emu.h", HERE / "emu.cpp", Path(__file__).resolve()]
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    h.update("\0".join([cxx, version, cuda_include, sys.version, *CXX_FLAGS]).encode())
    return h.hexdigest()[:16]


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(MODULE, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def build(out_dir, verbose: bool = False):
    """Compiles (or reuses) the emulated CUDA kernels under out_dir and returns the imported module."""
    cxx, cuda_include = find_cxx(), find_cuda_include()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX)")
    if cuda_include is None:
        raise RuntimeError("CUDA headers (cuda_runtime.h) not found: set CUDA_HOME or put nvcc on PATH")
    work = Path(out_dir).resolve() / f"cuda_emu-{_fingerprint(cxx, cuda_include)}"
    lib = work / (MODULE + sysconfig.get_config_var("EXT_SUFFIX"))
    if lib.is_file():
        return _load(lib)

    work.mkdir(parents=True, exist_ok=True)
    units = [HERE / "emu.cpp"]
    for cu in sorted((CSRC / "cuda").glob("*.cu")):
        text, n = rewrite_launches(cu.read_text(), str(cu))
        if n == 0:
            raise RuntimeError(f"{cu}: no kernel launch found to rewrite")
        dst = work / (cu.stem + ".cpp")
        dst.write_text(f'#include "emu.h"\n#line 1 "{cu}"\n{text}')
        units.append(dst)
    binding = work / "bindings_emu.cpp"
    binding.write_text(_binding_source(cuda_bindings()))
    units.append(binding)

    includes = [f"-I{d}" for d in _include_dirs(work, cuda_include)]

    def compile_one(src: Path) -> Path:
        obj = work / (src.stem + ".o")
        cmd = [cxx, *CXX_FLAGS, *includes, "-c", str(src), "-o", str(obj)]
        if verbose:
            print(" ".join(cmd), flush=True)
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"compiling {src} failed:\n{' '.join(cmd)}\n{r.stderr[-20000:]}")
        return obj

    with ThreadPoolExecutor(max_workers=JOBS) as pool:
        objects = list(pool.map(compile_one, units))
    tmp = lib.with_name(lib.name + f".tmp{os.getpid()}")
    cmd = [cxx, *CXX_FLAGS, "-shared", *map(str, objects), "-o", str(tmp)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"linking {lib} failed:\n{' '.join(cmd)}\n{r.stderr[-20000:]}")
    os.replace(tmp, lib)  # atomic: a concurrent builder never imports a half-written module
    return _load(lib)


if __name__ == "__main__":
    import time

    t0 = time.time()
    m = build(sys.argv[1] if len(sys.argv) > 1 else "/tmp/cuda_emu_build", verbose=True)
    print(f"built {m.__file__} in {time.time() - t0:.1f}s: {sorted(n for n in dir(m) if not n.startswith('_'))}")
