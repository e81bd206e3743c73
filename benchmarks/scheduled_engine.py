"""A stand-in for OpenRLHF's vLLM engine actor whose groups finish on a schedule, for what needs the real
SamplesGenerator without a GPU: the streaming-reward benchmark and tests/test_samples_generator.py.

`ScheduledEngine.generate_responses` has the real engine's signature and answers what OpenRLHF's
agent executor answers: one dict per sample with the prompt's tokens followed by a response. Each
prompt's group takes `seconds[prompt]` seconds (default 0), and the i-th response is the prompt's
`responses[prompt][i]` text (default: "response i"), so a test or benchmark chooses both the
long tail and the rewards (`reset` sets both: one engine serves many runs, its start-up is seconds). Groups run concurrently, as vLLM's continuous batching runs them.

A stand-in for CPU runs only: benchmarks/bench_streaming_rewards.py and tests/test_samples_generator.py use
it; no openrlhf_gd2po module imports it, and setup.cfg ships nothing under benchmarks/. Training, on any
machine, runs OpenRLHF's real vLLM engines.
"""

import asyncio
import sys

import ray


@ray.remote(num_cpus=0)
class ScheduledEngine:
    def __init__(self):
        # A second and more of lazy imports, here rather than in the first call, which unpickles vLLM's
        # SamplingParams and a transformers tokenizer.
        import pickle

        from transformers import PreTrainedTokenizerFast  # noqa: F401
        from vllm import SamplingParams

        pickle.loads(pickle.dumps(SamplingParams()))
        self.reset()

    def reset(self, seconds=None, responses=None, reward_urls=None):
        """A new schedule: seconds and response texts per prompt; forgets the prompts dispatched.
        `reward_urls` ({dimension: URL}): score each sample there as soon as it is generated, one POST per
        sample per server in a new session, as OpenRLHF's executor does with --reward.remote_url; the
        scores come back in the sample's extra_logs as reward/<dimension>."""
        self.seconds, self.responses, self.reward_urls = seconds or {}, responses or {}, reward_urls or {}
        self.scoring = asyncio.Semaphore(128)  # samples scored at once: vLLM's default max_num_seqs per engine
        self.prompts = []  # every prompt dispatched since, in order
        self.sampling = []  # (temperature, num_samples) of each, in the same order
        self.unfinished = 0

    def get_num_unfinished_requests(self):
        return self.unfinished

    def dispatched(self):
        return list(self.prompts)

    def sampled_with(self):
        return list(self.sampling)

    async def generate_responses(self, prompt, label, sampling_params, max_length, hf_tokenizer, num_samples=1,
                                 images=None):
        self.prompts.append(prompt)
        self.sampling.append((sampling_params.temperature, num_samples))
        self.unfinished += num_samples
        await asyncio.sleep(self.seconds.get(prompt, 0.0))
        self.unfinished -= num_samples
        prompt_ids = hf_tokenizer(prompt, add_special_tokens=False)["input_ids"]
        texts = self.responses.get(prompt) or [f"response {i}" for i in range(num_samples)]
        outputs = []
        for i in range(num_samples):
            action_ids = hf_tokenizer(texts[i % len(texts)], add_special_tokens=False)["input_ids"] or [0]
            outputs.append({
                "prompt": prompt, "label": label, "images": images, "mm_train_inputs": None,
                "observation_tokens": prompt_ids + action_ids,
                "action_ranges": [(len(prompt_ids), len(prompt_ids) + len(action_ids))],
                "rollout_log_probs": None, "truncated": False, "reward": None, "scores": None, "extra_logs": {},
            })
        if self.reward_urls:
            queries = [hf_tokenizer.decode(o["observation_tokens"], skip_special_tokens=False) for o in outputs]

            async def score(query):
                async with self.scoring:
                    urls = self.reward_urls.values()
                    return await asyncio.gather(*(post_one_sample(url, query, prompt, label) for url in urls))

            for output, row in zip(outputs, await asyncio.gather(*map(score, queries))):
                output["extra_logs"] = {f"reward/{name}": value for name, value in zip(self.reward_urls, row)}
        return outputs


async def post_one_sample(url, query, prompt, label):
    """OpenRLHF's remote reward call for one sample: a new aiohttp session, one POST, its first reward."""
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=180)) as session:  # OpenRLHF's timeout
        payload = {"query": [query], "prompts": [prompt], "labels": [label]}
        async with session.post(url, json=payload) as response:
            response.raise_for_status()
            return (await response.json())["rewards"][0]


# Ray workers cannot import this file by name (benchmarks/ is not on their path): ship the class by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
