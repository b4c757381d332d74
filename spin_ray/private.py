"""The private Ray, vLLM, DeepSpeed and torch APIs spin-ray still needs, in one place.

Each is pinned by constraints-cpu.txt (Ray 2.60, vLLM 0.32, DeepSpeed 0.19, torch 2.13) and says
which public API would replace it. An upgrade that breaks one breaks it here, by name.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any


def actor_id(handle: Any) -> str:
    """A stable id of an actor handle. Ray 2.60 has no public accessor on the handle itself
    (`ray.get_runtime_context().get_actor_id()` answers only inside the actor)."""
    return handle._actor_id.hex()


def autoscaler_cluster_config() -> Any:
    """The ClusterConfig an autoscaler reports to the GCS (KubeRay's), or None. Ray 2.60 has no
    public API for the autoscaler's node types; Ray Data reads them the same way."""
    from ray._private.state import state

    return state.get_cluster_config()


def openai_ingress(llm_deployments: dict, model_cards: dict) -> Any:
    """Ray Serve LLM's OpenAI request handling, to call from an ingress of our own. Ray 2.60's
    public `build_openai_app` builds a whole app whose ingress takes no bearer key or limits."""
    from ray.llm._internal.serve.core.ingress.ingress import OpenAiIngress

    return OpenAiIngress(llm_deployments, model_cards)


async def openai_request(ingress: Any, request: Any, kind: str) -> Any:
    """One parsed OpenAI request through that ingress, without the raw HTTP request (so the
    Authorization header stays with us). Public in Serve LLM once its ingress is composable."""
    return await ingress._process_llm_request(request, kind, None)


def model_card(name: str, llm_config: Any) -> Any:
    """The `/v1/models` entry Serve LLM builds for a config (no public builder in Ray 2.60)."""
    from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata

    return to_model_metadata(name, llm_config)


def local_adapter_loader(adapters: dict[str, str]) -> type:
    """A Serve LLM adapter loader that finds each LoRA adapter in a local dir ({adapter name:
    dir}), for `build_llm_deployment(bind_kwargs={"model_downloader": ...})`. Ray 2.60's own
    loader reads adapters from cloud storage only (lora_config.dynamic_lora_loading_path must be
    s3://, gs:// or abfss://), and the loader class, its result type and the id counter are private.
    Defined here so the class, with `adapters`, travels to the replicas by value; the id counter
    is imported in the replica, since the class would otherwise carry the driver's (and its lock)."""
    from ray.llm._internal.serve.utils.lora_serve_utils import LoraModelLoader

    class LocalAdapters(LoraModelLoader):
        async def load_model_from_config(self, lora_model_id: str, llm_config: Any) -> Any:
            from ray.llm._internal.common.models import global_id_manager
            from ray.llm._internal.serve.core.configs.llm_config import DiskMultiplexConfig

            name = lora_model_id.split(":", 1)[1]  # Serve LLM's "<base model id>:<adapter>"
            return DiskMultiplexConfig(
                model_id=lora_model_id,
                max_total_tokens=None,
                local_path=adapters[name],
                lora_assigned_int_id=global_id_manager.next(),
            )

    return LocalAdapters


def nccl_options(timeout: timedelta) -> Any:
    """NCCL group options whose timeout is honoured; torch 2.13 exposes the field only as
    `_timeout` when a group is built from a store directly (`init_process_group` takes it public)."""
    import torch.distributed as dist

    options = dist.ProcessGroupNCCL.Options()
    options._timeout = timeout
    return options


def zero3_full_state_dict(engine: Any) -> dict:
    """Every parameter gathered whole on rank 0 under ZeRO-3 (every rank must call it).
    DeepSpeed 0.19's public `save_16bit_model` writes to disk; we need the tensors."""
    return engine._zero3_consolidated_16bit_state_dict()


def object_store_bytes() -> int:
    """Bytes in use in this node's object store; Ray 2.60 has no public call for it."""
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    return get_memory_info_reply(get_state_from_address()).store_stats.object_store_bytes_used
