"""featx.core.env: what a bug report needs, as values."""

from __future__ import annotations

import json
import os

import torch

import featx
from featx.core.device import cpu_has_bf16
from featx.core.env import cpu_info, environment, format_environment

CPUINFO = """processor\t: 0
model name\t: Example CPU 9000
flags\t\t: fpu sse avx avx2 avx512f avx512bw avx512_bf16 amx_tile amx_bf16 avx512_vnni

processor\t: 1
model name\t: Example CPU 9000
flags\t\t: fpu sse avx avx2 avx512f avx512bw avx512_bf16 amx_tile amx_bf16 avx512_vnni
"""


def test_cpu_flags_from_cpuinfo():
    assert cpu_info(CPUINFO) == {
        "model": "Example CPU 9000",
        "flags": ["avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"],
    }
    assert cpu_info("processor\t: 0\nflags\t: fpu sse sse2\n")["flags"] == []


def test_environment_here(monkeypatch):
    monkeypatch.delenv("FEATX_CPU_BF16", raising=False)  # the flags and what auto picks from the hardware itself
    env = environment()
    assert json.loads(json.dumps(env)) == env  # what `featx env --json` prints
    assert env["featx"] == featx.__version__
    assert env["packages"]["torch"] == torch.__version__.split("+")[0]
    assert env["cpu"]["cores"] == os.cpu_count()
    assert env["cpu"]["torch_threads"] == torch.get_num_threads()
    assert ("avx512_bf16" in env["cpu"]["flags"] or "amx_bf16" in env["cpu"]["flags"]) == cpu_has_bf16()
    if torch.cuda.is_available():
        assert env["auto"]["device"] == "cuda"
        assert len(env["cuda_devices"]) == torch.cuda.device_count()
    else:  # this project's CPU machines: bf16 exactly where the CPU has it in hardware
        assert env["auto"] == {"device": "cpu", "precision": "bf16" if cpu_has_bf16() else "fp32"}
        assert env["cuda_devices"] == []
    text = format_environment(env).splitlines()
    assert f"featx: {featx.__version__}" in text
    assert f"--device auto: {env['auto']['device']}; --precision auto: {env['auto']['precision']}" in text
    assert ("cuda devices: none" in text) == (not env["cuda_devices"])
