"""The policy in another process: push the trainer's weights to an `openk2 serve` rollout server, and
roll out through that server with the interface `RolloutWorker` uses.

At scale, rollouts and training sit on different devices or machines; after every optimizer step the
trainer sends its weights to the inference engine. Here the transport is HTTP: the trainer's state
dict as one safetensors file, `POST /weights` with the server's weight-update token (`openk2 serve
--weight-update-token`, off by default). The server checks the whole payload before it touches a
weight and swaps it in between two engine steps (`Engine.load_weights`), so a push works across
machines and a bad one leaves the served policy as it was.

`WeightPusher.push` serialises, sends and times one sync (`SyncStats`: bytes, seconds, GB/s);
`RemoteEngine` is the engine-shaped adapter the RL trainer uses with `rollout_server` set: its
`generate` runs requests on the server (`/v1/completions` with token-id prompts and
`return_token_ids`), its `load_weights` pushes.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import torch
from safetensors.torch import save as save_safetensors
from torch import nn

from openk2.serve.engine import Completion, RequestOutput, TokenLogprob
from openk2.serve.sampling import SamplingParams

WEIGHT_TOKEN_ENV = "OPENK2_WEIGHT_UPDATE_TOKEN"  # the same variable `openk2 serve` reads


class WeightSyncError(ConnectionError):
    """The rollout server refused a weight push or a request, or could not be reached (one line; an
    OSError, so `openk2 rl` reports it as `error: ...`)."""


@dataclass
class SyncStats:
    """One weight push: payload bytes, seconds to serialise, seconds on the wire and in the server's
    checks and swap (`send_s`), of which `load_s` the server's own check and copy."""

    bytes: int
    serialize_s: float
    send_s: float
    load_s: float
    version: int

    @property
    def seconds(self) -> float:
        return self.serialize_s + self.send_s

    @property
    def gbps(self) -> float:
        """Payload GB (1e9 bytes) per second of the whole sync."""
        return self.bytes / 1e9 / self.seconds if self.seconds > 0 else float("inf")


def weights_payload(source: nn.Module | dict[str, torch.Tensor]) -> bytes:
    """A state dict as the bytes of one safetensors file (CPU, contiguous; tensors that share storage,
    such as tied embeddings, are copied apart, as the format requires)."""
    state = source.state_dict() if isinstance(source, nn.Module) else source
    seen: set[tuple[int, int]] = set()
    tensors = {}
    for name, t in state.items():
        t = t.detach().cpu().contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen:
            t = t.clone()
        seen.add(key)
        tensors[name] = t
    return save_safetensors(tensors)


def _error_message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:200]


class WeightPusher:
    """Pushes weights to one server's `POST /weights`."""

    def __init__(self, base_url: str, token: str, timeout: float = 600.0):
        if not token:
            raise WeightSyncError(f"no weight-update token for {base_url} (set ${WEIGHT_TOKEN_ENV})")
        self.url = base_url.rstrip("/").removesuffix("/v1") + "/weights"
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream"}
        self.client = httpx.Client(timeout=timeout)

    def push(self, source: nn.Module | dict[str, torch.Tensor]) -> SyncStats:
        t0 = time.perf_counter()
        payload = weights_payload(source)
        t1 = time.perf_counter()
        try:
            response = self.client.post(self.url, content=payload, headers=self.headers)
        except httpx.HTTPError as e:
            raise WeightSyncError(f"weight push to {self.url} failed: {type(e).__name__}: {e}") from None
        t2 = time.perf_counter()
        if response.status_code != 200:
            raise WeightSyncError(
                f"weight push to {self.url} refused ({response.status_code}): {_error_message(response)}"
            )
        answer = response.json()
        return SyncStats(
            len(payload), t1 - t0, t2 - t1, float(answer["load_seconds"]), int(answer["version"])
        )

    def close(self) -> None:
        self.client.close()


class RemoteEngine:
    """What `RolloutWorker` and `evaluate` use of an `Engine` (`tokenizer`, `max_seq_len`, `generate`,
    `load_weights`), served by an `openk2 serve` process at `base_url` (`http://host:port`).

    `generate` sends one `/v1/completions` request per prompt, `max_parallel` at a time, so the
    server batches them; each comes back with its token ids, per-token log-probs and finish reason,
    as a local engine's `RequestOutput`. `load_weights` pushes the weights and returns the sync's
    seconds; `last_sync` keeps its `SyncStats`. `weight_token` defaults to
    $OPENK2_WEIGHT_UPDATE_TOKEN; `api_key` is the server's `--api-key`, if it has one. The tokenizer
    is the trainer's: the server must serve the same one (checked at start on a probe string).
    Grammar-constrained sampling is not sent over (a request with one is refused)."""

    UNSUPPORTED = ("grammar", "stop_token_ids", "banned_token_ids", "keep_special_token_ids")

    def __init__(
        self,
        base_url: str,
        tokenizer,
        weight_token: str | None = None,
        api_key: str | None = None,
        max_parallel: int = 32,
        timeout: float = 600.0,
    ):
        self.base = base_url.rstrip("/").removesuffix("/v1")
        self.tokenizer = tokenizer
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=self.base, headers=headers, timeout=timeout)
        self.max_parallel = max_parallel
        try:
            models = self.client.get("/v1/models")
        except httpx.HTTPError as e:
            raise WeightSyncError(
                f"rollout server {self.base} unreachable: {type(e).__name__}: {e}"
            ) from None
        if models.status_code != 200:
            raise WeightSyncError(
                f"rollout server {self.base}: /v1/models answered {models.status_code}: "
                + _error_message(models)
            )
        self.model_name = models.json()["data"][0]["id"]
        probe = self.client.post("/tokenize", json={"model": self.model_name, "prompt": "0"})
        if probe.status_code != 200:
            raise WeightSyncError(f"rollout server {self.base}: /tokenize answered {probe.status_code}")
        self.max_seq_len = int(probe.json()["max_model_len"])  # tokens per cache slot, prompt included
        if probe.json()["tokens"] != tokenizer.encode("0"):
            raise WeightSyncError(f"rollout server {self.base} serves another tokenizer than the trainer's")
        self.pusher = WeightPusher(self.base, weight_token or os.environ.get(WEIGHT_TOKEN_ENV, ""), timeout)
        self.last_sync: SyncStats | None = None

    def load_weights(self, source: nn.Module | dict[str, torch.Tensor]) -> float:
        self.last_sync = self.pusher.push(source)
        return self.last_sync.seconds

    def generate(
        self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None
    ) -> list[RequestOutput]:
        if not isinstance(params, list):
            params = [params or SamplingParams()] * len(prompts)
        elif len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
        if not prompts:
            return []
        with ThreadPoolExecutor(min(self.max_parallel, len(prompts))) as pool:
            return list(pool.map(self._one, prompts, params))

    def _one(self, prompt: list[int], params: SamplingParams) -> RequestOutput:
        for name in self.UNSUPPORTED:
            if getattr(params, name):
                raise ValueError(f"RemoteEngine: SamplingParams.{name} is not sent to the server")
        body = {
            "model": self.model_name,
            "prompt": [int(t) for t in prompt],
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "top_k": params.top_k,
            "n": params.n,
            "stop": params.stop or None,
            "ignore_eos": params.ignore_eos,
            "logit_bias": {str(k): v for k, v in params.logit_bias.items()} or None,
            "return_token_ids": True,
        }
        if params.seed is not None:
            body["seed"] = params.seed
        if params.logprobs:
            body["logprobs"] = params.top_logprobs
        try:
            response = self.client.post("/v1/completions", json=body)
        except httpx.HTTPError as e:
            raise WeightSyncError(f"rollout request to {self.base} failed: {type(e).__name__}: {e}") from None
        if response.status_code != 200:
            raise WeightSyncError(
                f"rollout server {self.base} answered {response.status_code}: {_error_message(response)}"
            )
        completions = []
        for choice in sorted(response.json()["choices"], key=lambda c: c["index"]):
            logprobs = []
            if params.logprobs:
                lp = choice["logprobs"]
                logprobs = [
                    TokenLogprob(t, float(v), []) for t, v in zip(choice["token_ids"], lp["token_logprobs"])
                ]
            completions.append(
                Completion(
                    choice["index"], choice["token_ids"], choice["text"], logprobs, choice["finish_reason"]
                )
            )
        return RequestOutput(response.headers.get("x-request-id", ""), list(prompt), completions)

    def close(self) -> None:
        self.client.close()
        self.pusher.close()
