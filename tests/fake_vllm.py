"""A stand-in for the ``vllm`` package (not installed here, and it needs a GPU): records what prefkit hands to
``LLM(...)`` and ``generate(...)`` and returns canned completions, so the vLLM path is tested on the CPU."""

from __future__ import annotations

import importlib.machinery
import types
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Completion:
    text: str
    token_ids: list[int]


@dataclass
class RequestOutput:
    outputs: list[Completion]


@dataclass
class Record:
    llm_kwargs: list[dict] = field(default_factory=list)
    model_files: list[list[str]] = field(default_factory=list)  # the model dir's files when the engine was built
    inputs: list[list[dict]] = field(default_factory=list)
    params: list[object] = field(default_factory=list)
    on_build: list = field(default_factory=list)  # callables(model_dir) run when an engine is built


def make(words: tuple[str, ...] = ("cat", "dog", "red", "big", "mat")) -> tuple[types.ModuleType, Record]:
    """The fake module and its record. Sample j of every prompt is ``j + 1`` words, so samples differ in length."""
    record = Record()

    class SamplingParams:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    class LLM:
        def __init__(self, **kwargs):
            record.llm_kwargs.append(kwargs)
            model = Path(kwargs["model"])
            record.model_files.append(sorted(p.name for p in model.iterdir()) if model.is_dir() else [])
            for fn in record.on_build:
                fn(model)

        def generate(self, inputs, params):
            record.inputs.append(list(inputs))
            record.params.append(params)
            n = params.kwargs["n"]
            return [RequestOutput([Completion(" ".join(words[: j + 1]), list(range(j + 1))) for j in range(n)])
                    for _ in inputs]

    module = types.ModuleType("vllm")
    module.__spec__ = importlib.machinery.ModuleSpec("vllm", None)  # find_spec reads it
    module.LLM, module.SamplingParams = LLM, SamplingParams
    return module, record
