"""The one way commands build a backend: a checkpoint in-process, or an endpoint over HTTP."""

from __future__ import annotations

from openk2.client.types import Backend


def make_backend(
    model: str | None = None,
    endpoint: str | None = None,
    *,
    api_key: str | None = None,
    served_model: str | None = None,
    timeout: float = 60.0,
    max_retries: int = 1,
    concurrency: int = 4,
    max_batch: int = 8,
    constrained: bool = True,
) -> Backend:
    """model: a checkpoint or run directory (in-process engine); endpoint: an OpenAI-compatible URL
    (served_model: the model name sent to it, default its first listed). Exactly one of the two."""
    if (model is None) == (endpoint is None):
        raise ValueError("give exactly one of --model CHECKPOINT or --endpoint URL")
    if endpoint is not None:
        from openk2.client.http import EndpointBackend

        return EndpointBackend(endpoint, served_model, api_key, timeout, max_retries, concurrency)
    from openk2.client.local import LocalBackend

    return LocalBackend(model, max_batch=max_batch, constrained=constrained)
