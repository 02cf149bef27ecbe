"""`kdprompt bench mixing`: distinct classes per batch, before and after shuffled writing and interleaving."""

from __future__ import annotations

import json


def test_bench_mixing_prints_before_and_after(cli, tmp_path):
    result = cli(
        "bench",
        "mixing",
        "--classes",
        "30",
        "--per-class",
        "20",
        "--maxcount",
        "20",
        "--shuffle-buffer",
        "10",
        "--batches",
        "40",
        "--workdir",
        tmp_path,
    )
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output)
    distinct = figures["distinct_classes_per_batch"]
    before = distinct["split order, one shard at a time (before)"]
    after = distinct["shuffled write, 16 shards interleaved (after)"]
    iid = distinct["uniform shuffle (i.i.d.)"]
    assert figures["samples"] == 600 and figures["shards"] == 30
    assert before < 3 < 6 < after <= 8 and abs(after - iid) < 1
