"""The vLLM engine actors, their weight receiver, the health-checked pool and the handle on them."""
