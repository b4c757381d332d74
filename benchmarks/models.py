"""Random Llama checkpoints for the benchmarks, made here with the toy tokenizer (no hub)."""

from pathlib import Path
from typing import Any

import torch


def make_llama(out_dir: Path, **shape: Any) -> int:
    """Saves a random fp32 Llama of `shape` (LlamaConfig fields) + the toy tokenizer; returns the
    parameter count (tied weights once). head_dim = hidden / heads must be 32 or 64 for vLLM on CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from spin_ray.toy_model import make_tokenizer

    tok = make_tokenizer()
    defaults = {"vocab_size": len(tok), "tie_word_embeddings": False, "max_position_embeddings": 1024}
    config = LlamaConfig(
        **defaults | shape,
        head_dim=shape["hidden_size"] // shape["num_attention_heads"],
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        dtype="float32",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return sum(p.numel() for p in model.parameters())


def start_engines(model_dir: Path, generation: Any, max_model_len: int) -> Any:
    """The job's engines (spin_ray.engines.client.Engines) on `model_dir` in fp32, once all are up."""
    from spin_ray.config import Config, ModelConfig
    from spin_ray.engines.client import Engines

    engines = Engines(Config(model=ModelConfig(dtype="float32"), generation=generation), str(model_dir), max_model_len)
    engines.wait_ready()
    return engines
