"""The model replica's scheduler on its own (no Serve): the real engine on the tiny model, real asyncio.
Admission by KV-cache bytes, a caller that leaves, a request too large for the budget, and one failing
request among healthy ones in a static batch (a model whose cache is never cut)."""

from __future__ import annotations

import asyncio

import pytest

from helpers import tiny_llama


@pytest.fixture(scope="module")
def engine(smol_tokenizer, tmp_path_factory):
    from rayft.training.generation import TransformersEngine

    model = tiny_llama(tmp_path_factory.mktemp("sched-model"), smol_tokenizer, sharp=True, vocab_size=32768)
    return TransformersEngine(str(model), threads=1)


def request(engine, text: str, max_tokens: int):
    from rayft.training.generation import GenerationRequest

    return GenerationRequest(prompt_ids=engine.tokenizer(text)["input_ids"], max_tokens=max_tokens, temperature=0)


def scheduler(engine, budget_requests: float, max_tokens: int, merge: bool = True):
    from rayft.serving.model import Scheduler
    from rayft.training.generation import RunningBatch

    per = engine.kv_bytes_per_token()
    one = (len(engine.tokenizer("hello there")["input_ids"]) + max_tokens) * per
    return Scheduler(RunningBatch(engine, merge=merge), 8, 0.0, int(one * budget_requests), per)


def largest_batch(sched, engine, n: int, max_tokens: int) -> list[int]:
    async def one():
        return max([d["batch_size"] async for d in sched.submit(request(engine, "hello there", max_tokens))])

    async def run():
        return await asyncio.gather(*[one() for _ in range(n)])

    return asyncio.run(run())


def test_admission_is_budgeted_by_kv_cache_bytes(engine):
    assert largest_batch(scheduler(engine, 1.5, 40), engine, 3, 40) == [1, 1, 1]  # one fits at a time
    assert max(largest_batch(scheduler(engine, 3.5, 40), engine, 3, 40)) == 3  # all three fit together
    from rayft.serving.openai_api import ApiError

    with pytest.raises(ApiError, match="serve.kv_cache_gib") as e:
        scheduler(engine, 1.5, 40).check_fits(request(engine, "hello there", 400))
    assert e.value.status == 400 and e.value.code == "context_length_exceeded"


def test_a_caller_that_leaves_is_out_of_the_batch_at_the_next_step(engine):
    sched = scheduler(engine, 10, 200)

    async def leaver():
        got = 0
        async for _ in sched.submit(request(engine, "hello there", 200)):
            got += 1
            if got == 3:
                break  # closes the generator, as a disconnected stream or a cancelled call does

    async def stayer():
        return [d["batch_size"] async for d in sched.submit(request(engine, "hello there", 40))]

    async def run():
        return await asyncio.gather(leaver(), stayer())

    _, sizes = asyncio.run(run())
    assert sizes[0] == 2 and sizes[-1] == 1
    assert sizes.index(1) <= 5  # it ran alone within two steps of the other's third token
    assert sched.counts["cancelled"] == 1 and sched.counts["tokens_after_cancel"] <= 1
    assert sched.counts["generated_for_cancelled"] <= 3 + 1  # what it read, and the step in flight when it left
    assert sched.counts["finished"] == 1 and not sched.running and not sched.pending


def test_a_failing_request_fails_alone_in_a_static_batch(engine):
    from rayft.serving.openai_api import ApiError

    tok = engine.tokenizer
    sched = scheduler(engine, 10, 30, merge=False)
    bad = next(i for i in range(32768, len(tok)) if tok.decode([i]).startswith(" "))
    broken = request(engine, "hello there", 30)
    broken.prompt_ids = broken.prompt_ids + [bad]

    async def take(req):
        try:
            return "".join([d["text"] async for d in sched.submit(req)])
        except ApiError as e:
            return e

    async def run():
        return await asyncio.gather(
            take(request(engine, "hello there", 30)), take(broken), take(request(engine, "hi", 30))
        )

    good1, failed, good2 = asyncio.run(run())
    assert isinstance(failed, ApiError) and failed.status == 500 and "IndexError" in failed.message
    assert isinstance(good1, str) and good1 and isinstance(good2, str) and good2
    assert sched.counts == {
        "finished": 2,
        "failed": 1,
        "cancelled": 0,
        "tokens_after_cancel": 0,
        "generated_for_cancelled": 0,
    }
