"""The set-up builds llama-cpp-python portable, so the wheel pip caches runs on any x86-64 CPU with
AVX2, whatever CPU built it."""

from pathlib import Path

import llama_cpp

ROOT = Path(__file__).resolve().parents[2]


def test_llama_cpp_is_built_without_native_cpu_features():
    recipe = (ROOT / "Makefile").read_text().split("$(STAMP): ", 1)[1].split("\n\n", 1)[0]
    assert "CMAKE_ARGS=\"-DGGML_NATIVE=OFF\" $(PY) -m pip install" in recipe
    info = llama_cpp.llama_print_system_info().decode()
    # a native build on a CPU with AVX-512 (like the machines this project runs on) lists AVX512 here
    assert "AVX2 = 1" in info and "AVX512" not in info
