"""IDR-LMM: Iterative Data Refinement with a self-improved large multimodal model (paper 4.4).

* :mod:`.scorer` -- the LMM scorer (score ``p_R``/``c_R``/feedback, per-image feedback ``p_F``,
  summary ``p_S``) on any OpenAI-compatible server, with a resumable result store;
* :mod:`.batch` -- the same requests through the Batch API, or as JSONL for ``vllm run-batch``;
* :mod:`.simulated_lmm` -- a local OpenAI-compatible server that judges EPBD-synth images from
  their pixels, for tests and the offline demo;
* ``prompts/`` -- the shipped templates ``score.txt`` (p_R), ``feedback.txt`` (p_F),
  ``summarize.txt`` (p_S) and the default in-context examples ``examples_epbd_synth.json`` (c_R).

Names are imported lazily so that ``import diffusers_product2img.idr`` does not need the
``score`` extra (``openai``, ``pydantic``) until a scorer is used.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LMMScorer": "scorer",
    "OpenAICompatibleScorer": "scorer",
    "ScorerConfig": "scorer",
    "PromptSet": "scorer",
    "Sample": "scorer",
    "Example": "scorer",
    "LMMResult": "scorer",
    "RunReport": "scorer",
    "ResultStore": "scorer",
    "ScoreReply": "scorer",
    "ScorerError": "scorer",
    "ScorerAuthError": "scorer",
    "load_examples": "scorer",
    "select_samples": "scorer",
    "add_scorer_args": "scorer",
    "scorer_config_from_args": "scorer",
    "prompts_from_args": "scorer",
    "BatchRunner": "batch",
    "write_batch_jsonl": "batch",
    "import_batch_output": "batch",
    "SimulatedLMMServer": "simulated_lmm",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
