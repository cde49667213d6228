"""Bad input gets a typed error naming the field; nobody else is disturbed."""
from __future__ import annotations

import pytest

from server.core.identity import AdapterVersion
from server.engine.types import Request, SamplingParams
from server.core.errors import AdapterLoadError, AdapterRejectedError, CapacityError, InvalidRequestError
from tests.engine.engine_utils import make_engine
from tests.helpers import peft_greedy


@pytest.fixture(scope="module")
def engine(tiny_dir):
    eng = make_engine(tiny_dir, max_waiting=3, max_batch_size=2)
    yield eng
    eng.shutdown()


@pytest.mark.parametrize("prompt, params, field", [
    ([1] * 600, SamplingParams(), "prompt"),
    ([], SamplingParams(), "prompt"),
    ([1, 2], SamplingParams(max_new_tokens=0), "max_new_tokens"),
    ([1, 2], SamplingParams(max_new_tokens=511), "max_new_tokens"),
    ([1, 2], SamplingParams(temperature=-1), "temperature"),
    ([1, 2], SamplingParams(temperature=float("nan")), "temperature"),
    ([1, 2], SamplingParams(top_p=0), "top_p"),
    ([1, 2], SamplingParams(top_p=1.5), "top_p"),
    ([1, 2], SamplingParams(top_k=-3), "top_k"),
    ([1, 2], SamplingParams(seed=-1), "seed"),
    ([1, 99999], SamplingParams(), "prompt_token_ids"),
])
def test_out_of_range_is_rejected_naming_the_field(engine, prompt, params, field):
    with pytest.raises(InvalidRequestError) as e:
        engine.submit(Request(prompt, params))
    assert e.value.field == field
    assert "range" in str(e.value) or "at most" in str(e.value) or "least" in str(e.value)


def test_max_new_tokens_message_gives_allowed_range(engine):
    with pytest.raises(InvalidRequestError, match=r"allowed range is \[1, 502\]"):
        engine.submit(Request([1] * 10, SamplingParams(max_new_tokens=9999)))


def test_failing_adapter_load_fails_only_its_request(engine, tiny_dir):
    def bad_load():
        raise AdapterRejectedError("adapter_model.safetensors: lying header")

    bad = AdapterVersion("default", "broken", 1, "broken-digest", bad_load)
    good = engine.submit(Request([9, 8, 7], SamplingParams(max_new_tokens=8, ignore_eos=True)))
    with pytest.raises(AdapterLoadError, match="broken.*lying header"):
        engine.submit(Request([9, 8, 7], SamplingParams(max_new_tokens=8), bad)).collect()
    assert good.collect().token_ids == peft_greedy(tiny_dir, None, [9, 8, 7], 8)
    # A later request for the same adapter tries again (and fails again), never served by the base.
    with pytest.raises(AdapterLoadError):
        engine.submit(Request([1], SamplingParams(max_new_tokens=2), bad)).collect()


def test_queue_full_is_capacity_error_and_duplicate_ids_rejected(engine):
    import time

    long = SamplingParams(max_new_tokens=400, ignore_eos=True)
    streams = [engine.submit(Request([1, 2], long, request_id=f"r{i}")) for i in range(2)]
    deadline = time.monotonic() + 10
    while engine.stats().running < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    streams += [engine.submit(Request([1, 2], long, request_id=f"r{i}")) for i in range(2, 5)]
    with pytest.raises(InvalidRequestError, match="already in flight"):
        engine.submit(Request([1, 2], long, request_id="r4"))
    with pytest.raises(CapacityError, match="queue is full"):
        engine.submit(Request([1, 2], long, request_id="r5"))
    for s in streams:
        engine.abort(s.request_id)
    for s in streams:
        assert s.collect().finish_reason == "abort"


def test_submit_many_queues_all_or_nothing(engine):
    """A refused request refuses its whole arrival: nothing of it is queued, and the rest can come again."""
    params = SamplingParams(max_new_tokens=2, ignore_eos=True)
    with pytest.raises(InvalidRequestError, match="temperature"):
        engine.submit_many([Request([1, 2], params, request_id="ok1"),
                            Request([1, 2], SamplingParams(temperature=-1), request_id="bad")])
    with pytest.raises(InvalidRequestError, match="given to two requests"):
        engine.submit_many([Request([1, 2], params, request_id="twice"), Request([3], params, request_id="twice")])
    with pytest.raises(CapacityError, match="queue is full"):  # 4 waiting would pass max_waiting=3
        engine.submit_many([Request([1, 2], params, request_id=f"m{i}") for i in range(4)])
    assert engine.stats().waiting == 0 and engine.stats().running == 0
    streams = engine.submit_many([Request([1, 2], params, request_id=i) for i in ("ok1", "twice", "m0")])
    assert [len(s.collect().token_ids) for s in streams] == [2, 2, 2]
