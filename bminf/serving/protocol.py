"""The OpenAI HTTP API as bminf serves it: request schemas, response and chunk bodies, error bodies.

Only what the server uses is declared; unknown request fields are ignored, as most OpenAI-compatible
servers do, and fields with no meaning here (``logprobs``, ``echo``, ...) are refused when set.

>>> CompletionRequest(model="cpm2", prompt="天空").max_tokens is None
True
>>> error_body("bad", param="top_p")["error"]["param"]
'top_p'
"""
import time
import uuid
from typing import Any, Dict, List, Optional, Union

from pydantic import BaseModel, ConfigDict

__all__ = ["CompletionRequest", "ChatRequest", "ChatMessage", "APIError", "error_body", "new_id"]


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None            # extension (vLLM, llama.cpp): bminf's top_n
    frequency_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    stop: Union[str, List[str], None] = None
    seed: Optional[int] = None
    n: int = 1
    stream: bool = False
    stream_options: Optional[Dict[str, Any]] = None
    # accepted only at their "off" values: bminf computes no log-probabilities, biases or tools
    logprobs: Any = None
    logit_bias: Optional[Dict[str, Any]] = None
    user: Optional[str] = None


class CompletionRequest(_Sampling):
    prompt: Union[str, List[str]]
    echo: Optional[bool] = None
    suffix: Optional[str] = None
    best_of: Optional[int] = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: Union[str, List[Dict[str, Any]], None] = None


class ChatRequest(_Sampling):
    messages: List[ChatMessage]
    max_completion_tokens: Optional[int] = None
    top_logprobs: Optional[int] = None
    tools: Optional[List[Any]] = None
    response_format: Optional[Dict[str, Any]] = None


class APIError(Exception):
    """An error the client gets as ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return error_body(self.message, self.param, self.code, self.type)


def error_body(message: str, param: Optional[str] = None, code: Optional[str] = None,
               type: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())
