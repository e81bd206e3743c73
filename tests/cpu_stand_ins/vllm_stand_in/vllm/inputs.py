from vllm import SamplingParams as TokensPrompt  # noqa: F401  (raises on use)
