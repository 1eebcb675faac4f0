"""Documents sharded across 2 CPU processes (torchrun, gloo) give exactly the totals of one process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_tokenizers import sample_text
from typer.testing import CliRunner

from longctx.cli import app
from longctx.sharding import Shard, in_order

ROOT = Path(__file__).parents[1]
TORCHRUN = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")


def test_single_process_shard_is_everything():
    shard = Shard()
    assert shard.split(5) == [0, 1, 2, 3, 4] and shard.gather_json([[0, "a"]]) == [[[0, "a"]]]
    assert shard.device("cpu") == "cpu"
    assert in_order([[[2, "c"], [3, "d"]], [[0, "a"], [1, "b"]]]) == ["a", "b", "c", "d"]


@pytest.mark.skipif(not Path(TORCHRUN).exists(), reason="torchrun is not installed")
def test_two_cpu_processes_equal_one(model_dir, tmp_path, isolated_home):
    docs = []
    for i, size in enumerate((1500, 900, 2100, 1200, 600)):  # odd count: the shards are unequal
        p = tmp_path / f"d{i}.txt"
        p.write_text(sample_text(size, seed=i), encoding="utf-8")
        docs.append(str(p))
    args = ["ppl", *docs, "--model", model_dir, "--segment", "64", "-m", "window", "--json"]
    one = json.loads(CliRunner().invoke(app, args).stdout)
    env = {**os.environ, "LONGCTX_HOME": str(isolated_home), "LONGCTX_THREADS": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    log = tmp_path / "run.jsonl"
    r = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "longctx", *args, "--run-log", str(log)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    two = json.loads(r.stdout)  # rank 0 alone prints: stdout is exactly one object
    assert two["processes"] == 2 and one["processes"] == 1
    keys = ("path", "sha256", "nll_sum", "tokens", "bytes", "segments", "token_sha256", "ppl")
    assert [{k: f[k] for k in keys} for f in two["files"]] == [{k: f[k] for k in keys} for f in one["files"]]
    assert two["micro"] == one["micro"] and two["macro"] == one["macro"]
    assert len(log.read_text().splitlines()) == 5  # both ranks appended their own documents
