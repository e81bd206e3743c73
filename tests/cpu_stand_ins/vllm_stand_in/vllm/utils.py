def random_uuid():
    raise RuntimeError("vllm is a CPU test stand-in here; install the real vllm on a GPU machine")
