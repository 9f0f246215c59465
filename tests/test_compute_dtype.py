"""compute_dtype=auto: bf16 where the device multiplies it natively, fp32 elsewhere."""
import sys

import pytest
import torch

import utils

CPU = torch.device("cpu")
XEON_AVX512F = "processor\t: 0\nmodel name\t: Intel Xeon\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512vl\n"
XEON_AMX = XEON_AVX512F.replace("avx512vl", "avx512vl avx512_bf16 amx_tile amx_bf16")
GRAVITON = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


@pytest.mark.skipif(sys.platform == "darwin", reason="macOS reports CPU features through sysctl")
@pytest.mark.parametrize("cpuinfo,native", [(XEON_AVX512F, False), (XEON_AMX, True), (GRAVITON, True)])
def test_native_bf16_is_read_from_the_cpu_flags(tmp_path, monkeypatch, cpuinfo, native):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    (tmp_path / "cpuinfo").write_text(cpuinfo)
    assert utils.cpu_has_bf16(tmp_path / "cpuinfo") is native


@pytest.mark.skipif(sys.platform == "darwin", reason="macOS reports CPU features through sysctl")
@pytest.mark.parametrize("limit,native", [("AVX512_CORE", False), ("avx2", False), ("AVX512_CORE_VNNI", False),
                                          ("AVX512_CORE_BF16", True), ("AVX512_CORE_AMX", True), ("ALL", True)])
def test_a_onednn_isa_limit_below_bf16_means_no_native_bf16(tmp_path, monkeypatch, limit, native):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", limit)  # how a CPU without bf16 is imitated on one with it
    (tmp_path / "cpuinfo").write_text(XEON_AMX)
    assert utils.cpu_has_bf16(tmp_path / "cpuinfo") is native


@pytest.mark.parametrize("native,want", [(False, torch.float32), (True, torch.bfloat16)])
def test_auto_picks_bf16_only_where_it_is_native_and_says_so(monkeypatch, native, want):
    monkeypatch.setattr(utils, "bf16_is_native", lambda device: native)
    lines = []
    assert utils.choose_compute_dtype("auto", CPU, lines.append) == want
    assert len(lines) == 1 and ("has native bf16" if native else "has no native bf16") in lines[0]


def test_explicit_bf16_without_native_support_is_kept_with_the_measured_rates(monkeypatch):
    monkeypatch.setattr(utils, "bf16_is_native", lambda device: False)
    monkeypatch.setattr(utils, "matmul_gflops", lambda device, dtype: {torch.bfloat16: 43.0, torch.float32: 107.0}[dtype])
    lines = []
    assert utils.choose_compute_dtype("bfloat16", CPU, lines.append) == torch.bfloat16
    assert len(lines) == 1 and "43 GFLOP/s against 107" in lines[0]
    lines.clear()
    assert utils.choose_compute_dtype("float32", CPU, lines.append) == torch.float32 and not lines

