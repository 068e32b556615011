"""starchat: a serving stack for StarChat-beta and the GPTBigCode family."""

from starchat.outputs import Completion, FinishReason, StreamDelta, TokenLogprob
from starchat.sampling_params import GuidedDecoding, SamplingParams, SamplingParamsError

__all__ = ["LLM", "AsyncLLM", "SamplingParams", "SamplingParamsError", "GuidedDecoding", "Completion", "StreamDelta", "TokenLogprob",
           "FinishReason", "EngineConfig"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: `import starchat` stays cheap (no torch) for the CLI's --help and for tools.
    if name == "LLM":
        from starchat.llm import LLM

        return LLM
    if name == "AsyncLLM":
        from starchat.engine.async_llm import AsyncLLM

        return AsyncLLM
    if name == "EngineConfig":
        from starchat.config import EngineConfig

        return EngineConfig
    raise AttributeError(f"module 'starchat' has no attribute {name!r}")
