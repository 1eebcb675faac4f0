"""`--dtype auto`: bf16 only where matmuls run natively in bf16 (CUDA, CPUs with AMX or AVX512-BF16), else fp32."""

from __future__ import annotations

import pytest
import torch

from longctx.errors import UsageError
from longctx.model import models

AVX2_ONLY = "flags\t\t: fpu sse sse2 avx avx2 fma avx512f avx512bw avx512_vnni\n"


@pytest.mark.parametrize("cpuinfo,native", [
    (AVX2_ONLY, False),
    (AVX2_ONLY.replace("avx512_vnni", "avx512_vnni avx512_bf16"), True),
    (AVX2_ONLY.replace("avx512_vnni", "amx_bf16 amx_tile"), True),
    ("", False),
])
def test_native_bf16_is_read_from_the_cpu_flags(cpuinfo, native):
    assert models._cpu_has_native_bf16(cpuinfo) is native


def test_auto_picks_bf16_only_with_native_bf16_matmuls(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(models, "_cpu_has_native_bf16", lambda: False)
    assert models.parse_dtype("auto", cpu) == torch.float32
    monkeypatch.setattr(models, "_cpu_has_native_bf16", lambda: True)
    assert models.parse_dtype("auto", cpu) == torch.bfloat16
    assert models.parse_dtype("fp32", cpu) == torch.float32  # an explicit choice is kept whatever the CPU


def test_auto_on_cuda_picks_bf16_where_the_gpu_has_it(monkeypatch):
    monkeypatch.setattr(models, "_cpu_has_native_bf16", lambda: False)  # the CPU does not matter on a GPU
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert models.auto_dtype(torch.device("cuda")) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert models.auto_dtype(torch.device("cuda")) == torch.float16


def test_this_machine_gets_what_its_flags_say():
    expected = torch.bfloat16 if models._cpu_has_native_bf16() else torch.float32
    assert models.parse_dtype("auto") == expected


def test_an_unknown_dtype_is_refused():
    with pytest.raises(UsageError, match="unknown dtype 'int8'"):
        models.parse_dtype("int8")
