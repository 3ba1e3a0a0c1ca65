"""The HTTP gateway: Open Inference Protocol (KServe v2 / Triton REST) and OpenAI-style completions over DIN."""
