"""Continuous-batching engine: scheduler, block manager with prefix caching, runner, sampling.

Knows neither HTTP nor Ray; the expert transport reaches it through the model's expert backend.
"""
from serve_app.engine.async_engine import AsyncEngine, EngineStepError, EngineStoppedError
from serve_app.engine.core import EngineCore
from serve_app.engine.llm import LLM
from serve_app.engine.sampling_params import SamplingParams, SamplingParamsError
from serve_app.engine.sequence import (CompletionOutput, EngineError, EngineOverloadedError, FinishReason,
                                       RequestOutput, RequestRejectedError)

__all__ = ["AsyncEngine", "EngineStepError", "EngineStoppedError", "EngineCore", "LLM", "SamplingParams", "SamplingParamsError",
           "CompletionOutput", "EngineError", "EngineOverloadedError", "FinishReason", "RequestOutput",
           "RequestRejectedError"]
