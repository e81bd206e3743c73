"""Score query groups while the rest of the step still generates: merged requests on a background loop.

The samples generator submits each prompt's group as soon as vLLM has finished it. Groups wait in one
buffer and go out together, one request per target, as soon as another group would not fit in
`batch_size` samples, `flush_wait` seconds after the first of them arrived, or at `flush()` (the caller
has nothing more to submit for now). So a reward-model server is still paid per batch, not per group.

Everything else means what it means for `fetch_rewards` (reward_client): each request has `timeout`
and `retries`; each target keeps one session and one `Replicas` for the whole stream, so
`max_in_flight` and a replica found down hold across requests; `deadline` bounds each request from the
moment it is sent, so after the last group is submitted the caller waits at most `deadline` seconds;
`on_failure="raise"` fails the futures of the request's groups with the error, "mask" marks rows failed.
"""

import asyncio
import concurrent.futures
import math
import threading

from openrlhf_gd2po.reward_client import (
    RewardBatch, check_agent_columns, check_arguments, check_samples, load_reward_files, open_targets, score_samples,
)


class RewardStream:
    def __init__(self, dimensions, batch_size=256, timeout=300.0, retries=3, max_in_flight=8, on_failure="raise",
                 deadline=600.0, flush_wait=0.5):
        check_arguments(dimensions, [], [], [], batch_size, timeout, retries, max_in_flight, on_failure, deadline)
        if isinstance(flush_wait, bool) or not isinstance(flush_wait, (int, float)) or not 0 <= flush_wait < math.inf:
            raise ValueError(f"flush_wait must be a finite number of seconds >= 0, got {flush_wait!r}")
        self.dimensions, self.batch_size, self.deadline = dimensions, batch_size, deadline
        self.on_failure, self.flush_wait = on_failure, flush_wait
        self.buffer = []  # groups not sent yet: (first sample number, columns as score_samples takes them, future)
        self.submitted = 0  # samples submitted so far: sample numbers in error messages count from here
        self.requests = 0  # requests sent to each target
        self.seconds = dict.fromkeys((d.name for d in dimensions), 0.0)  # per dimension, summed over requests
        self.flush_timer = None
        self.in_flight = set()
        load_reward_files(dimensions)  # a broken reward file fails here, before the step generates
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="reward_stream")
        self.thread.start()
        self.targets_context = open_targets(dimensions, timeout, retries, max_in_flight)
        self.targets = self._call(self.targets_context.__aenter__())

    def submit(self, queries, prompts, labels, model_turns=None, agent_values=None) -> concurrent.futures.Future:
        """One group's samples; the future's result is their RewardBatch, rows in the order given.
        Agent rollouts add `model_turns` and `agent_values`, as fetch_rewards takes them."""
        check_samples(queries, prompts, labels)
        check_agent_columns(self.dimensions, queries, model_turns, agent_values)
        future = concurrent.futures.Future()
        columns = {"queries": queries, "prompts": prompts, "labels": labels, "model_turns": model_turns,
                   "agent_values": agent_values}
        columns = {key: None if value is None else list(value) for key, value in columns.items()}
        group = (self.submitted, columns, future)
        self.submitted += len(queries)
        self.loop.call_soon_threadsafe(self._add, group)
        return future

    def flush(self):
        """Send what is buffered now: nothing more will be submitted until some result is back."""
        self.loop.call_soon_threadsafe(self._send)

    def close(self):
        """Cancel what is buffered or in flight (their futures are cancelled), close the sessions, stop the loop."""
        async def shut_down():
            if self.flush_timer is not None:
                self.flush_timer.cancel()
            for *_, future in self.buffer:
                future.cancel()
            for task in list(self.in_flight):
                task.cancel()
            await asyncio.gather(*self.in_flight, return_exceptions=True)
            await self.targets_context.__aexit__(None, None, None)

        try:
            self._call(shut_down())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join()
            self.loop.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    # The rest runs on the stream's loop.

    def _add(self, group):
        if sum(len(g[1]["queries"]) for g in self.buffer) + len(group[1]["queries"]) > self.batch_size:
            self._send()
        self.buffer.append(group)
        if sum(len(g[1]["queries"]) for g in self.buffer) >= self.batch_size:
            self._send()
        elif self.flush_timer is None:
            self.flush_timer = self.loop.call_later(self.flush_wait, self._send)

    def _send(self):
        if self.flush_timer is not None:
            self.flush_timer.cancel()
            self.flush_timer = None
        if not self.buffer:
            return
        groups, self.buffer = self.buffer, []
        self.requests += 1
        task = self.loop.create_task(self._score(groups))
        self.in_flight.add(task)
        task.add_done_callback(self.in_flight.discard)

    async def _score(self, groups):
        # One stream scores one kind of rollout: a column is None in every group or in none.
        columns = {key: None if value is None else [x for group in groups for x in group[1][key]]
                   for key, value in groups[0][1].items()}
        try:
            batch = await score_samples(self.targets, self.dimensions, batch_size=self.batch_size,
                                        deadline=self.deadline, on_failure=self.on_failure,
                                        first_sample=groups[0][0], **columns)
        except asyncio.CancelledError:  # close()
            for *_, future in groups:
                future.cancel()
            raise
        except Exception as error:  # on_failure="raise": every group of this request fails with the error
            for *_, future in groups:
                future.set_exception(error)
            return
        for name, seconds in batch.seconds.items():
            self.seconds[name] += seconds
        start = 0
        for _, group_columns, future in groups:
            rows = slice(start, start + len(group_columns["queries"]))
            start = rows.stop
            future.set_result(RewardBatch(batch.rewards[rows], batch.failed[rows], batch.seconds))
