"""RoutingLog: streaming to disk (the same file and summary as keeping records in memory, resume
cuts the file back bitwise) and records copied from a device without blocking."""

import json

import pytest
import torch

from benchmarks.common import count_host_reads
from molf import MolfError, RoutingLog

MODULES = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.mlp.up_proj",
    "model.layers.1.mlp.up_proj",
]
EXPERTS = ["fft", "lora_r8"]


def _records(n: int, seed: int = 0) -> list[tuple]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for step in range(1, n + 1):
        scores = torch.rand(len(MODULES), len(EXPERTS), generator=g)
        winners = torch.zeros_like(scores, dtype=torch.bool)
        winners.scatter_(1, scores.argmax(dim=1, keepdim=True), True)
        active = torch.rand(len(MODULES), generator=g) > 0.2
        out.append((step, winners & active[:, None], scores, active))
    return out


def _log(records) -> RoutingLog:
    log = RoutingLog(MODULES, EXPERTS)
    for r in records:
        log.append(*r)
    return log


def test_streaming_writes_the_same_file_and_summary_and_keeps_no_records(tmp_path):
    records = _records(12)
    memory = _log(records)
    memory.write_jsonl(tmp_path / "memory.jsonl")
    stream = _log(records[:3])  # records made before streaming starts are written first
    stream.stream_to(tmp_path / "stream.jsonl")
    for r in records[3:]:
        stream.append(*r)
    assert stream.records == [] and len(stream) == 12
    assert stream.last()["step"] == 12
    assert stream.summary() == memory.summary()
    stream.close()
    assert (tmp_path / "stream.jsonl").read_bytes() == (tmp_path / "memory.jsonl").read_bytes()
    assert stream.summary() == memory.summary()  # the totals outlive the file


def test_resume_cuts_the_file_back_to_the_checkpoint_and_continues_bitwise(tmp_path):
    records = _records(10)
    straight = RoutingLog(MODULES, EXPERTS)
    straight.stream_to(tmp_path / "straight.jsonl")
    for r in records:
        straight.append(*r)
    straight.close()

    path = tmp_path / "run.jsonl"
    first = RoutingLog(MODULES, EXPERTS)
    first.stream_to(path)
    for r in records[:4]:
        first.append(*r)
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
    for r in records[4:7]:  # steps after the checkpoint, lost by a kill
        first.append(*r)
    first.close()

    resumed = RoutingLog(MODULES, EXPERTS)
    resumed.stream_to(path, state)
    assert len(resumed) == 4
    for r in records[4:]:
        resumed.append(*r)
    resumed.close()
    assert path.read_bytes() == (tmp_path / "straight.jsonl").read_bytes()
    assert resumed.summary() == straight.summary()
    # a rank that writes no file restores the totals alone
    other = RoutingLog(MODULES, EXPERTS)
    other.stream_to(None, state)
    assert len(other) == 4 and other.summary() == _log(records[:4]).summary()


def test_a_routing_log_shorter_than_the_checkpoint_is_one_clear_error(tmp_path):
    log = RoutingLog(MODULES, EXPERTS)
    log.stream_to(tmp_path / "a.jsonl")
    for r in _records(3):
        log.append(*r)
    state = log.state_dict()
    log.close()
    (tmp_path / "a.jsonl").write_text("")
    with pytest.raises(MolfError, match="shorter than"):
        RoutingLog(MODULES, EXPERTS).stream_to(tmp_path / "a.jsonl", state)
    with pytest.raises(ValueError, match="streaming"):
        RoutingLog(MODULES, EXPERTS).state_dict()


def test_a_streaming_log_holds_only_totals_however_long_the_run(tmp_path):
    log = RoutingLog(MODULES, EXPERTS)
    log.stream_to(tmp_path / "r.jsonl")
    for n in (10, 100):
        for r in _records(n):
            log.append(*r)
        state = log.state_dict()
        assert log.records == [] and state["steps"] == len(log)
        assert sorted(state) == ["active", "bytes", "steps", "wins"]
        assert len(state["wins"]) == len(MODULES) and len(state["active"]) == len(MODULES)
    assert state["bytes"] == (tmp_path / "r.jsonl").stat().st_size


def test_records_from_a_device_complete_later_without_blocking():
    log = RoutingLog(MODULES, EXPERTS)
    step, winners, scores, active = _records(1)[0]
    # meta tensors hold no values: count_host_reads fills the copies with zeros and counts them
    with count_host_reads() as reads:
        log.append(step, winners.to("meta"), scores.to("meta"), active.to("meta"))
        log.append(step + 1, winners.to("meta"), scores.to("meta"), active.to("meta"))
        assert len(log) == 2
    assert reads.blocking == [] and len(reads.non_blocking) == 6
    assert [r["step"] for r in log.records] == [1, 2]
    assert log.records[0]["scores"].dtype == torch.float32


def test_a_streaming_log_answers_totals_and_refuses_per_step_queries(tmp_path):
    import molf

    log = RoutingLog(["a", "b"], ["fft", "lora"])
    log.stream_to(tmp_path / "routing.jsonl")
    for step in range(3):
        winners = torch.tensor([[True, False], [False, True]])
        log.append(step, winners, torch.zeros(2, 2), torch.ones(2, dtype=torch.bool))
    assert log.overall_shares() == {"fft": 0.5, "lora": 0.5}  # the whole run, from the totals
    for query in (log.winner_indices, log.share_over_steps, lambda: log.overall_shares(2)):
        with pytest.raises(molf.MoLFError, match="streams its records to a file"):
            query()
    log.close()
    kept = RoutingLog.read_jsonl(tmp_path / "routing.jsonl")
    assert kept.overall_shares(2) == {"fft": 0.5, "lora": 0.5} and len(kept.share_over_steps()) == 3
