"""The machine: one Llama-family model, its adapters and heads; generate, score, train.

    from engine import Engine, SamplingParams
    eng = Engine.load("default")
    out = eng.generate([[{"role": "user", "content": "Hi"}]], SamplingParams(temperature=0))
"""
from engine.engine import Engine
from engine.errors import InputError
from engine.generate import RequestOutput, Sample
from engine.sampling import SamplingParams

__all__ = ["Engine", "InputError", "RequestOutput", "Sample", "SamplingParams"]
