"""bench.py's figures, where they are printed from."""
import json
import sys

import pytest

import bench
import default_model
import plan
import utils


@pytest.mark.slow
def test_figures_are_printed_with_the_cache_behind_a_symlink(tmp_path, monkeypatch, capsys):
    real = tmp_path / "bigger_disk"
    real.mkdir()
    cache = tmp_path / "bench_cache"
    cache.symlink_to(real)  # a cache folder kept on another disk
    monkeypatch.setattr(default_model, "CACHE", cache)
    monkeypatch.setattr(sys, "argv", ["bench.py", "--shape", "tiny", "--layers", "1", "--steps", "1", "--cold",
                                      "--memory_budget", "0"])
    bench.main()
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["cpu"] == utils.cpu_name() and figures["bf16_native"] == utils.cpu_has_bf16()
    assert figures["layers"] == 1 and len(figures["step_s_all"]) == 1
    assert not any(real.iterdir())  # what the run made is removed
    # the floors: the disk's bytes at its rates (as rounded in the figures), the larger floor over the step
    f = figures
    disk_s = f["disk_read_bytes_per_step"] / (f["disk_read_gbps"] * 1e9) + \
        f["disk_write_bytes_per_step"] / (f["disk_write_gbps"] * 1e9)
    assert f["disk_floor_s"] == pytest.approx(disk_s, rel=0.02, abs=0.01)
    assert f["efficiency"] == pytest.approx(max(f["compute_floor_s"], f["disk_floor_s"]) / f["step_s_median"],
                                            abs=0.006 / f["step_s_median"] + 2e-3)  # (floors rounded to 2 places)
    assert f["recomputed_blocks"] == 1  # no room for the one block's graph at --memory_budget 0
    args = default_model.shape_args("tiny", 1)
    n = plan.matmul_params(args)  # the block's and the output's matrices; the block's forward once more
    assert f["flops_per_step"] == 6 * n * f["tokens_per_step"] + 2 * (n - args.vocab_size * args.dim) * f["tokens_per_step"]
