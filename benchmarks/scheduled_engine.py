"""A stand-in for OpenRLHF's vLLM engine actor whose groups finish on a schedule, for what needs the real
SamplesGenerator without a GPU: the streaming-reward benchmark and tests/test_samples_generator.py.

`ScheduledEngine.generate_responses` has the real engine's signature and answers what OpenRLHF's
agent executor answers: one dict per sample with the prompt's tokens followed by a response. Each
prompt's group takes `seconds[prompt]` seconds (default 0), and the i-th response is the prompt's
`responses[prompt][i]` text (default: "response i"), so a test or benchmark chooses both the
long tail and the rewards (`reset` sets both: one engine serves many runs, its start-up is seconds). Groups run concurrently, as vLLM's continuous batching runs them.
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

    def reset(self, seconds=None, responses=None):
        """A new schedule: seconds and response texts per prompt; forgets the prompts dispatched."""
        self.seconds, self.responses = seconds or {}, responses or {}
        self.prompts = []  # every prompt dispatched since, in order
        self.unfinished = 0

    def get_num_unfinished_requests(self):
        return self.unfinished

    def dispatched(self):
        return list(self.prompts)

    async def generate_responses(self, prompt, label, sampling_params, max_length, hf_tokenizer, num_samples=1,
                                 images=None):
        self.prompts.append(prompt)
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
        return outputs


# Ray workers cannot import this file by name (benchmarks/ is not on their path): ship the class by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
