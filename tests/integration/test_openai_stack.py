"""An unchanged OpenAI client against drctl's load balancer on the real stack, across a failover.

What a team's clients send — ``POST /v1/completions`` and ``/v1/chat/completions`` with the model
in the JSON body, streamed or not — reaches the model's serving instance through Envoy; an unknown
model gets OpenAI's error; a stream open on an instance that is ``kill -9``ed is cut (lost in
flight: Envoy retries only before the response starts), and once the failover has run, new streams
are served by the promoted standby.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from datetime import UTC, datetime

import httpx
import openai
import pytest

from drctl.payloads import FailoverOutcome, FailoverRequest, Role, Trigger
from drctl.temporal.runbooks import start_failover
from drctl.workers.stack import LocalStack

pytestmark = pytest.mark.integration
MODEL = "llama-2-7b"
INSTANCE_HEADER = "x-drctl-instance"


def _client(stack: LocalStack) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{stack.settings.lb_url}/v1", api_key="unused", max_retries=0, timeout=15)


async def _until_served_by(client: openai.AsyncOpenAI, instance: str, timeout_s: float = 10.0) -> None:
    """Until three answers in a row come from ``instance`` (fails after ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    in_a_row = 0
    while in_a_row < 3:
        raw = await client.completions.with_raw_response.create(model=MODEL, prompt="who", max_tokens=1)
        in_a_row = in_a_row + 1 if raw.headers.get(INSTANCE_HEADER) == instance else 0
        if time.monotonic() > deadline:
            pytest.fail(f"Envoy does not route {MODEL} to its serving instance {instance}")
        await asyncio.sleep(0.05)


async def test_completions_and_chat_by_the_body_model(local_stack: LocalStack) -> None:
    client = _client(local_stack)
    completion = await client.completions.create(model=MODEL, prompt="hello", max_tokens=4)
    assert completion.model == MODEL and completion.choices[0].text
    chat = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=4
    )
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content
    other = await client.completions.create(model="mistral-7b", prompt="hello", max_tokens=2)
    assert other.model == "mistral-7b"
    models = [m.id async for m in client.models.list()]
    assert models and set(models) <= {"llama-2-7b", "mistral-7b", "gpt-4-8b"}


async def test_an_unknown_model_gets_openais_not_found(local_stack: LocalStack) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await _client(local_stack).completions.create(model="no-such-model", prompt="hello", max_tokens=1)
    assert caught.value.status_code == 404


async def test_a_stream_across_a_failover_is_cut_and_new_streams_reach_the_replacement(
    local_stack: LocalStack,
) -> None:
    assert local_stack.client is not None
    client = _client(local_stack)
    [victim] = [i for i in local_stack.platform.registry.of_model(MODEL) if i.role == Role.SERVING]
    # Precondition, not the subject: within a second or two of `drctl up` Envoy was seen to spread
    # requests over the hot standbys too (each host one request, no retry; in 4 of 6 runs of this
    # module alone, already at 447d885), though every host was healthy at its priority. Cause not
    # found yet (see the closing note of issue 12); the stream below must start on the serving one.
    await _until_served_by(client, victim.id)

    raw = await client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "a long answer"}], max_tokens=400, stream=True
    )
    assert raw.headers.get(INSTANCE_HEADER) == victim.id
    stream = raw.parse()
    chunks = [await anext(aiter(stream))]  # the first chunk came before the answer was finished
    os.kill(victim.pid or 0, signal.SIGKILL)
    with pytest.raises((openai.APIError, httpx.HTTPError)):
        async for chunk in stream:
            chunks.append(chunk)
    assert 1 <= len(chunks) < 400  # cut, not finished

    handle = await start_failover(
        local_stack.client,
        local_stack.settings,
        FailoverRequest(
            model=MODEL,
            instance=victim.id,
            reason="kill -9 mid-stream",
            trigger=Trigger.DRILL,
            failed_at=datetime.now(UTC),
        ),
    )
    result = await asyncio.wait_for(handle.result(), timeout=60)
    assert result.outcome == FailoverOutcome.RECOVERED and result.promoted

    after = await client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "again"}], max_tokens=8, stream=True
    )
    assert after.headers.get(INSTANCE_HEADER) == result.promoted
    text = "".join([chunk.choices[0].delta.content or "" async for chunk in after.parse() if chunk.choices])
    assert text
