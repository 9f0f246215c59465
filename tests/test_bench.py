"""bench.py's figures, where they are printed from."""
import json
import sys

import pytest

import bench
import default_model
import utils


@pytest.mark.slow
def test_figures_are_printed_with_the_cache_behind_a_symlink(tmp_path, monkeypatch, capsys):
    real = tmp_path / "bigger_disk"
    real.mkdir()
    cache = tmp_path / "bench_cache"
    cache.symlink_to(real)  # a cache folder kept on another disk
    monkeypatch.setattr(default_model, "CACHE", cache)
    monkeypatch.setattr(sys, "argv", ["bench.py", "--shape", "tiny", "--layers", "1", "--steps", "1"])
    bench.main()
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["cpu"] == utils.cpu_name() and figures["bf16_native"] == utils.cpu_has_bf16()
    assert figures["layers"] == 1 and len(figures["step_s_all"]) == 1
    assert not any(real.iterdir())  # what the run made is removed
