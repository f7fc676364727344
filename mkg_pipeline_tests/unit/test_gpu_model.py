"""benchmarks/gpu_model.py: the simulated GPU's scheduler and clock, driven by a fake clock (no sleeps).

The saturation benchmark's verdicts rest on this model, so it must reproduce the published figures
it is calibrated to and vLLM's scheduling rules: a step emits one token per running sequence,
at most ``max_num_seqs`` run, the KV cache bounds admission, the newest sequence is preempted when
the running ones outgrow the cache, and waiting requests are served first come, first served.
"""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str) -> ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


gm = _load("gpu_model")


def tiny(**overrides: object) -> object:
    """A small GPU with round numbers: steps of 10 ms + 1 ms per running sequence, 1 ms per prompt token."""
    params = {
        "name": "tiny",
        "max_num_seqs": 4,
        "kv_cache_tokens": 10_000,
        "step_base_s": 0.010,
        "step_per_seq_s": 0.001,
        "prefill_per_token_s": 0.001,
        "max_num_batched_tokens": 8192,
    }
    params.update(overrides)
    return gm.GpuPreset(**params)


def test_h100_preset_reproduces_olmocrs_published_throughput_at_full_batch() -> None:
    rng = random.Random(7)
    # outputs spread around the reference 1,000 tokens so that finishes do not come in synchronised waves
    requests = [(0.0, gm.REFERENCE_PROMPT_TOKENS, rng.randint(500, 1500)) for _ in range(4000)]
    engine, seqs = gm.run_offline(gm.H100, requests)
    finished = sorted(s.finished_at for s in seqs)
    steady = (3000 - 1000) / (finished[3000] - finished[1000])
    assert steady == pytest.approx(4.5, rel=0.03)  # olmOCR: 10,000 pages in 36 min 47 s on one H100
    assert engine.counters.peak_running == 256
    assert engine.counters.preemptions == 0  # the H100 preset is bound by max_num_seqs, not by its KV cache
    assert gm.H100.full_batch_requests_per_s() == pytest.approx(4.5)


def test_h100_preset_takes_about_ten_seconds_for_one_page_alone() -> None:
    _, (seq,) = gm.run_offline(gm.H100, [(0.0, gm.REFERENCE_PROMPT_TOKENS, gm.REFERENCE_OUTPUT_TOKENS)])
    assert seq.finished_at == pytest.approx(10.0, rel=0.01)
    assert gm.H100.single_request_s() == pytest.approx(10.0)


def test_fast_preset_is_the_h100_ten_times_faster() -> None:
    _, (seq,) = gm.run_offline(gm.H100_FAST, [(0.0, gm.REFERENCE_PROMPT_TOKENS, gm.REFERENCE_OUTPUT_TOKENS)])
    assert seq.finished_at == pytest.approx(1.0, rel=0.01)
    assert gm.H100_FAST.full_batch_requests_per_s() == pytest.approx(45.0)
    assert gm.H100_FAST.kv_cache_tokens == gm.H100.kv_cache_tokens


def test_a_step_emits_one_token_per_running_sequence_and_prefill_costs_its_prompt() -> None:
    engine = gm.GpuEngine(tiny())
    first, second = gm.Sequence(100, 3), gm.Sequence(50, 5)
    engine.submit(first, 0.0)
    engine.submit(second, 0.0)  # arrives during the first step: joins at the next boundary
    # step 1: first alone, prefill 100: 10 + 1 + 100 ms
    assert engine.next_event_at() == pytest.approx(0.111)
    engine.advance(0.111)
    # first wrote its first token; at that boundary second is admitted, its prompt's KV allocated
    assert engine.g == 1 and second.state == "running" and engine.kv_used == 101 + 50
    # step 2: both, second's prefill 50: 10 + 2 + 50 ms; step 3: 12 ms, where first writes its 3rd token:
    # the next event, with nothing to do in between
    assert engine.next_event_at() == pytest.approx(0.111 + 0.062 + 0.012)
    assert engine.advance(0.111 + 0.062) == [] and engine.g == 2
    done = engine.advance(0.111 + 0.062 + 0.012)
    assert done == [first] and first.finished_at == pytest.approx(0.185)
    assert engine.kv_used == 50 + 2  # first's KV freed, second wrote 2 tokens
    done = engine.advance(10.0)
    assert done == [second]
    # second: 2 tokens with first (steps 2-3), then 3 alone at 11 ms
    assert second.finished_at == pytest.approx(0.185 + 3 * 0.011)
    assert engine.counters.generation_tokens == 8
    assert engine.counters.prompt_tokens == 150
    assert not engine.busy and engine.next_event_at() is None


def test_requests_beyond_max_num_seqs_wait_in_arrival_order() -> None:
    engine = gm.GpuEngine(tiny(max_num_seqs=2))
    seqs = [gm.Sequence(10, 5 + i) for i in range(5)]
    for seq in seqs:
        engine.submit(seq, 0.0)
    engine.advance(0.001)
    assert [s.state for s in seqs] == ["running", "waiting", "waiting", "waiting", "waiting"]
    engine.advance(0.05)  # after the first step the scheduler fills the second slot
    assert len(engine.running) == 2 and list(engine.waiting) == seqs[2:]
    order = []
    t = 0.05
    while engine.busy:
        t = engine.next_event_at()
        order += engine.advance(t)
        assert len(engine.running) <= 2
    assert order == seqs  # FCFS in, and equal lengths out in order
    assert engine.counters.peak_waiting == 4  # at t = 0, before the first step began
    queued = [s.first_scheduled - s.arrived for s in seqs]
    assert queued == sorted(queued)


def test_admission_waits_for_kv_room_and_never_skips_the_head_of_the_queue() -> None:
    engine = gm.GpuEngine(tiny(kv_cache_tokens=1000))
    big, small = gm.Sequence(900, 50), gm.Sequence(10, 5)
    holder = gm.Sequence(500, 20)
    engine.submit(holder, 0.0)
    engine.advance(0.6)
    engine.submit(big, 0.6)  # 500 + 900 do not fit 1,000: big waits
    engine.submit(small, 0.6)  # would fit, but FCFS: it waits behind big
    engine.advance(0.7)
    assert engine.running == [holder] and list(engine.waiting) == [big, small]
    finished = []
    while engine.busy:
        finished += engine.advance(engine.next_event_at())
    assert finished[0] is holder and set(finished) == {holder, big, small}
    assert small.first_scheduled >= big.first_scheduled >= holder.finished_at
    assert engine.counters.preemptions == 0


def test_the_newest_sequence_is_preempted_exactly_when_the_cache_overflows_and_recomputed() -> None:
    # two sequences of prompt 100 in a 300-token cache: together they reach 300 tokens after 50 steps each
    engine = gm.GpuEngine(tiny(kv_cache_tokens=300))
    old, new = gm.Sequence(100, 80), gm.Sequence(100, 80)
    engine.submit(old, 0.0)
    engine.advance(0.0)
    engine.submit(new, 0.0)
    while engine.counters.preemptions == 0:
        assert engine.kv_used <= 300
        engine.advance(engine.next_event_at())
    # the step that would take the cache past 300 tokens is where new goes: not one step sooner
    assert engine.kv_used + len(engine.running) <= 300
    assert engine.running == [old] and list(engine.waiting) == [new]
    written, old_written = new.generated, engine.g - old.start_g
    assert (100 + old_written) + (100 + written) + 2 > 300  # the next step would not have fitted
    assert (100 + old_written - 1) + (100 + written - 1) + 2 <= 300  # the step before did
    assert new.state == "waiting" and new.preemptions == 1
    before = engine.counters.prefill_tokens
    finished = []
    while engine.busy:
        finished += engine.advance(engine.next_event_at())
    assert finished == [old, new]
    # recompute: its prompt and the tokens it had written are prefilled again; its output is kept
    assert engine.counters.prefill_tokens - before == 100 + written
    assert engine.counters.generation_tokens == 160
    assert engine.counters.preemptions == 1


def test_kv_bound_preset_preempts_when_a_client_overfills_it_and_the_h100_does_not() -> None:
    rng = random.Random(3)
    requests = [(0.0, 1360, rng.randint(200, 2000)) for _ in range(600)]
    engine, _ = gm.run_offline(gm.H100_KV, requests)
    assert engine.counters.preemptions > 0
    assert engine.counters.peak_running < 256  # the cache, not max_num_seqs, bounds the batch
    engine, _ = gm.run_offline(gm.H100, requests)
    assert engine.counters.preemptions == 0


def test_an_aborted_request_frees_its_slot_and_its_cache() -> None:
    engine = gm.GpuEngine(tiny(max_num_seqs=1))
    gone, next_ = gm.Sequence(100, 1000), gm.Sequence(10, 3)
    engine.submit(gone, 0.0)
    engine.submit(next_, 0.0)
    engine.advance(1.0)
    engine.abort(gone, 1.0)
    assert gone.state == "aborted"
    finished = []
    while engine.busy:
        finished += engine.advance(engine.next_event_at())
    assert finished == [next_] and engine.kv_used == 0


def test_a_cold_start_is_paced_by_the_step_token_budget() -> None:
    # the first arrival starts a step alone; then 8,192 batched tokens per step (less one per running
    # sequence) admit prompts of 1,360 tokens 6 at a time
    engine = gm.GpuEngine(gm.H100)
    for _ in range(256):
        engine.submit(gm.Sequence(1360, 1000), 0.0)
    assert len(engine.running) == 1
    for running in (7, 13, 19):
        engine.advance(engine.next_event_at())
        assert len(engine.running) == running


def test_image_tokens_follow_qwen_resizing_and_output_follows_page_density() -> None:
    # a 150-DPI letter page is 46 x 59 patches of 28 px, above max_pixels: resized to ~1,280 tokens
    assert gm.image_tokens(1275, 1650, gm.H100) <= 1280
    assert gm.image_tokens(1275, 1650, gm.H100) > 1100
    assert gm.image_tokens(560, 280, gm.H100) == 20 * 10
    assert gm.page_output_tokens(0, 1275, 1650) == 200
    assert gm.page_output_tokens(int(0.1 * 1275 * 1650), 1275, 1650) == 1100
    assert gm.page_output_tokens(10**8, 1275, 1650) == 2000
    assert gm.crop_output_tokens(int(0.1 * 1275 * 165), 1275, 165) == 110  # a tenth of the page


def test_ideal_makespan_of_one_request_is_its_latency() -> None:
    assert gm.ideal_makespan(gm.H100, [(1500, 1000)]) == pytest.approx(10.0, rel=0.01)
    assert gm.ideal_makespan(gm.H100, []) == 0.0


def test_calibration_refuses_figures_no_linear_step_time_can_meet() -> None:
    with pytest.raises(ValueError, match="inconsistent"):
        gm.calibrate(pages_per_s=100.0, single_page_s=10.0, max_num_seqs=256, prefill_tokens_per_s=20_000)
