"""A generation stream whose reader fell behind gets the queued steps as one message: tokens,
text and logprobs joined in order, the totals and finish of the latest; never past a final one."""
from __future__ import annotations

import asyncio

from tandem.workers.engine import RequestOutput
from tandem.workers.sequence import FinishReason
from tandem.workers.worker import _merge_ready


def step(token: int, total: int, finish: FinishReason | None = None) -> RequestOutput:
    return RequestOutput("r", (token,), f"<{token}>", (), finish, num_prompt_tokens=3, num_cached_tokens=0,
                         num_output_tokens=total)


def test_queued_outputs_join_and_stop_at_the_final_one() -> None:
    async def run() -> tuple[RequestOutput, RequestOutput, int]:
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        for item in (step(8, 2), step(9, 3, FinishReason.LENGTH)):
            queue.put_nowait(item)
        merged = _merge_ready(step(7, 1), queue)
        queue.put_nowait(step(6, 2))
        alone = _merge_ready(step(5, 1, FinishReason.STOP), queue)  # final: takes nothing behind it
        return merged, alone, queue.qsize()

    merged, alone, left = asyncio.run(run())
    assert merged.new_token_ids == (7, 8, 9) and merged.new_text == "<7><8><9>"
    assert merged.num_output_tokens == 3 and merged.finish_reason is FinishReason.LENGTH
    assert alone.new_token_ids == (5,) and left == 1
