"""Prompt sharding across ranks and rank 0's compute-or-reuse decision, on 2 real gloo processes."""

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from directalign.distributed import broadcast_from_rank_zero, map_sharded, shard, world
from directalign.generation import sample_completions
from directalign.store import Ranks, Store
from tests.conftest import tiny_llama
from tests.test_ddp import LLAMA


class TinyTokenizer:
    eos_token_id, pad_token_id = 1, 0


PROMPTS = [[(7 * i + j) % 60 + 2 for j in range(3 + i % 4)] for i in range(11)]


def greedy(prompts: list[list[int]]) -> list[list[int]]:
    model = tiny_llama(**LLAMA)
    samples = sample_completions(
        model, TinyTokenizer(), prompts, num_samples=1, max_new_tokens=6, batch_size=4, do_sample=False
    )
    return [s[0] for s in samples]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def on_two_ranks(rank: int, port: int, out: Path, task: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        if task == "sample":
            torch.save({"world": world(), "samples": map_sharded(PROMPTS, greedy)}, out / f"rank{rank}.pt")
        else:
            os.environ["LOCAL_RANK"] = str(rank)  # as Lightning's launcher marks the ranks it starts
            store, calls = Store(out / "store"), []

            def squares(folder: Path) -> dict:
                calls.append(folder.name)
                return {"squares": map_sharded(list(range(10)), lambda xs: [x * x for x in xs])}

            first = store.run("evaluate", {"n": 1}, {}, squares, ranks=Ranks.SHARDED)
            again = store.run("evaluate", {"n": 1}, {}, squares, ranks=Ranks.SHARDED)
            result = {"calls": len(calls), "metrics": [first.metrics, again.metrics]}
            torch.save(result, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_two_ranks(tmp_path: Path, task: str) -> list[dict]:
    mp.spawn(on_two_ranks, args=(free_port(), tmp_path, task), nprocs=2, join=True)
    return [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]


def test_shards_are_disjoint_and_cover_every_item():
    shards = [list(shard(11, rank, 3)) for rank in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(11))
    assert [len(s) for s in shards] == [4, 4, 3]


def test_without_a_process_group_everything_runs_here():
    assert world() == (0, 1)
    assert map_sharded([3, 1, 2], lambda items: [x * 10 for x in items]) == [30, 10, 20]
    assert broadcast_from_rank_zero("mine") == "mine"


@pytest.mark.slow
def test_two_ranks_sample_half_the_prompts_each_and_both_get_all_in_order(tmp_path):
    """Greedy decoding is per prompt, so the gathered shards equal one process sampling everything."""
    ranks = run_two_ranks(tmp_path, "sample")
    single = greedy(PROMPTS)
    assert len({tuple(s) for s in single}) > 3, "the tiny model must not answer every prompt alike"
    for rank, result in enumerate(ranks):
        assert result["world"] == (rank, 2)
        assert result["samples"] == single


@pytest.mark.slow
def test_both_ranks_compute_a_sharded_stage_then_both_reuse_it(tmp_path):
    """Rank 0 tells rank 1 whether it computes: both join the sharded compute the first time (rank 0
    alone writes the manifest, with every rank's part), and both skip it the second time."""
    ranks = run_two_ranks(tmp_path, "store")
    expected = {"squares": [x * x for x in range(10)]}
    assert [r["calls"] for r in ranks] == [1, 1]
    assert [r["metrics"] for r in ranks] == [[expected, expected]] * 2
