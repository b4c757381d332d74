"""User evaluation hooks for the end-to-end runs (`eval.hooks`): one that works, one that fails."""

from pathlib import Path


def checkpoint(checkpoint_dir: str, iteration: int) -> dict[str, float]:
    return {"iteration": iteration, "has_weights": float(any(Path(checkpoint_dir).glob("*.safetensors")))}


def broken(checkpoint_dir: str, iteration: int) -> dict[str, float]:
    raise RuntimeError("a user's evaluation that fails")
