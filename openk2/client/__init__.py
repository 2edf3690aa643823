"""One client for every model caller (evaluation, data synthesis): HTTP, in-process and scripted
backends behind one `Backend` interface, one retry policy, one resumable JSONL runner.

    backend = make_backend(model="runs/tiny")               # or endpoint="http://127.0.0.1:8000/v1"
    results = backend.chat_many([ChatRequest(messages)])     # errors recorded, never raised
    client = LLMClient(backend)                               # async, cached, raises LLMError
"""

from openk2.client.client import LLMClient, Stats
from openk2.client.factory import make_backend
from openk2.client.http import EndpointBackend
from openk2.client.local import LocalBackend
from openk2.client.retry import RetryPolicy, is_transient
from openk2.client.runner import Rejected, RunSummary, extract_json, read_jsonl, run_jsonl
from openk2.client.scripted import ScriptedBackend
from openk2.client.types import (
    Backend,
    ChatRequest,
    ChatResult,
    CompletionRequest,
    CompletionResult,
    ContextOverflow,
    LLMError,
    ToolCallOut,
    TransientError,
)

__all__ = [
    "Backend",
    "ChatRequest",
    "ChatResult",
    "CompletionRequest",
    "CompletionResult",
    "ContextOverflow",
    "EndpointBackend",
    "LLMClient",
    "LLMError",
    "LocalBackend",
    "Rejected",
    "RetryPolicy",
    "RunSummary",
    "ScriptedBackend",
    "Stats",
    "ToolCallOut",
    "TransientError",
    "extract_json",
    "is_transient",
    "make_backend",
    "read_jsonl",
    "run_jsonl",
]
