"""`openk2 eval TASK --model CHECKPOINT | --endpoint URL` and `openk2 eval compare A.json B.json ...`.

Tasks: humaneval, perplexity, gym, toolcall, safety. Each run writes results/<task>-<label>.json (config,
metrics, per-item records), a .md table next to it, and a .jsonl of per-item records as it goes;
rerunning the same command resumes where an interrupted run stopped. The default label is the model's
name plus a hash of model and config, so two different runs never write the same files.
`max_tokens` is capped at what the model's context leaves (the engine's, or what the endpoint's
/v1/models or /health reports), and `--log-samples` keeps every raw reply.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict
from pathlib import Path
from urllib.parse import urlparse

from openk2.eval.harness import (
    ContextCappedBackend,
    ResultStore,
    SampleLog,
    compare_table,
    default_label,
    endpoint_context,
    load_result,
    result_table,
)

TASKS = ("humaneval", "perplexity", "gym", "toolcall", "safety", "compare")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("task", choices=TASKS, help="what to run; `compare` takes result JSON files")
    p.add_argument("results", nargs="*", help="(compare) result JSON files")
    src = p.add_argument_group("model source (exactly one, except for humaneval --reference)")
    src.add_argument("--model", help="checkpoint or run directory (its latest checkpoint), run in-process")
    src.add_argument("--endpoint", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    src.add_argument(
        "--served-model", help="model name to send to the endpoint (default: the first it lists)"
    )
    src.add_argument(
        "--api-key", default=os.environ.get("OPENAI_API_KEY"), help="bearer token for the endpoint"
    )
    src.add_argument("--timeout", type=float, default=60.0, help="seconds per HTTP request")
    src.add_argument("--retries", type=int, default=1, help="retries of a timed-out or 5xx request")
    src.add_argument("--concurrency", type=int, default=4, help="HTTP requests in flight")
    src.add_argument("--max-batch", type=int, default=8, help="(local) engine batch slots")
    src.add_argument(
        "--no-constrained", action="store_true", help="(local) no constrained decoding for forced tool calls"
    )
    run = p.add_argument_group("run")
    run.add_argument("--out", default="results", help="directory for result files")
    run.add_argument(
        "--name",
        help="label of the model in file names and tables (default: its name plus a hash of model and "
        "config, so the same command resumes and another run never collides)",
    )
    run.add_argument(
        "--log-samples",
        action="store_true",
        help="also write every request and the model's raw reply to <result>.samples.jsonl",
    )
    run.add_argument("--restart", action="store_true", help="discard saved items of this run and start over")
    run.add_argument("--batch-size", type=int, default=8, help="items per batch (and per checkpoint save)")
    run.add_argument("--no-progress", action="store_true")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument(
        "--temperature", type=float, default=None, help="default 0: greedy, so scores are reproducible"
    )
    run.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="reply budget (default 512), always capped at what the model's context leaves",
    )
    he = p.add_argument_group("humaneval")
    he.add_argument("--n-samples", type=int, default=1)
    he.add_argument("--k", type=int, nargs="+", default=[1], help="pass@k for each k (<= n-samples)")
    he.add_argument("--mode", choices=("chat", "completion"), default="chat")
    he.add_argument("--reference", choices=("canonical", "empty"), help="check the harness: no model")
    he.add_argument("--limit", type=int, help="first N problems only")
    he.add_argument("--workers", type=int, default=2, help="sandboxes at once")
    pp = p.add_argument_group("perplexity")
    pp.add_argument("--text", default="shakespeare", help="corpus name or file/dir; its tail is scored")
    pp.add_argument("--chars", type=int, default=200_000, help="characters of held-out tail")
    pp.add_argument("--context", type=int, default=0, help="window tokens (0: the model's max, <= 2048)")
    pp.add_argument("--stride", type=int, default=0, help="window step (0: context // 2)")
    gy = p.add_argument_group("gym")
    gy.add_argument("--envs", nargs="+", help="environments (default: arithmetic sorting math game24)")
    gy.add_argument("--n-tasks", type=int, default=20, help="tasks per environment")
    gy.add_argument("--split", choices=("train", "test"), default="test")
    gy.add_argument("--max-turns", type=int, default=12)
    tc = p.add_argument_group("toolcall")
    tc.add_argument("--cases", help="suite JSON (default: the shipped toolcall_cases.json)")
    tc.add_argument("--only", nargs="+", help="case ids or id prefixes")
    tc.add_argument("--no-stream", action="store_true", help="skip the streamed half (no agreement metric)")
    from openk2.eval import safety

    safety.add_arguments(p)


def _base_label(args: argparse.Namespace, backend) -> str:
    if args.model:
        path = Path(args.model).resolve()
        # runs/small/checkpoints/step-0000200 -> small-step-0000200
        return f"{path.parent.parent.name}-{path.name}" if path.parent.name == "checkpoints" else path.name
    if backend is not None:
        return f"{backend.model}@{urlparse(args.endpoint).netloc}"
    return f"reference-{args.reference}"


def _store(args: argparse.Namespace, task: str, base: str, config: dict) -> ResultStore:
    config = {**config, **_source(args)}
    label = args.name or default_label(base, _source(args), config)
    return ResultStore(args.out, task, label, config)


def _source(args: argparse.Namespace) -> dict:
    if args.model:
        return {"model": str(Path(args.model).resolve()), "constrained": not args.no_constrained}
    if args.endpoint:
        return {"endpoint": args.endpoint, "served_model": args.served_model}
    return {"reference": args.reference}


def _wrap(backend, args: argparse.Namespace, store: ResultStore):
    """The backend with max_tokens kept inside the model's context, and --log-samples."""
    if backend is None:
        return None
    if args.endpoint:
        capped = ContextCappedBackend(backend, endpoint_context(args.endpoint, args.api_key, args.timeout))
    else:
        from openk2.tokenizer.chat import encode_chat

        tok = backend.tokenizer

        def count(req) -> int:
            if hasattr(req, "messages"):
                return len(encode_chat(tok, req.messages, req.tools, add_generation_prompt=True).ids)
            return len(tok.encode(req.prompt))

        capped = ContextCappedBackend(backend, backend.engine.max_seq_len, count)
    if args.log_samples:
        path = store.json_path.with_suffix(".samples.jsonl")
        if args.restart:
            path.unlink(missing_ok=True)
        return SampleLog(capped, path)
    return capped


def _compare(paths: list[str]) -> int:
    if not paths:
        raise ValueError("openk2 eval compare: give one or more result JSON files")
    print(compare_table([load_result(p) for p in paths]))
    return 0


def run(args: argparse.Namespace) -> int:
    if args.task == "compare":
        return _compare(args.results)
    if args.results:
        raise ValueError(f"unexpected arguments {args.results}; only `compare` takes result files")
    return _run_task(args)


def _run_task(args: argparse.Namespace) -> int:
    from openk2.client import make_backend

    temp = args.temperature if args.temperature is not None else 0.0
    run_kw = {"batch_size": args.batch_size, "restart": args.restart, "progress": not args.no_progress}
    needs_model = not (args.task == "humaneval" and args.reference)
    if needs_model and (args.model is None) == (args.endpoint is None):
        raise ValueError("give exactly one of --model CHECKPOINT or --endpoint URL")
    if not needs_model and (args.model or args.endpoint):
        raise ValueError("--reference checks the harness alone; drop --model/--endpoint")
    for name in ("batch_size", "concurrency", "max_batch", "n_samples", "n_tasks", "max_turns", "workers"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.model:
        from openk2.checkpoint import resolve_checkpoint

        args.model = str(resolve_checkpoint(args.model))  # a run directory: its latest checkpoint

    if args.task == "perplexity":
        from openk2.eval import perplexity

        if args.endpoint:
            raise ValueError(
                "perplexity needs the weights (--model): OpenAI endpoints do not score given text"
            )
        cfg = perplexity.PerplexityConfig(args.text, args.chars, args.context, args.stride, args.batch_size)
        store = _store(args, "perplexity", _base_label(args, None), asdict(cfg))
        return _report(perplexity.run(args.model, cfg, store, **run_kw), store)

    backend = None
    if needs_model:
        backend = make_backend(
            args.model,
            args.endpoint,
            api_key=args.api_key,
            served_model=args.served_model,
            timeout=args.timeout,
            max_retries=args.retries,
            concurrency=args.concurrency,
            max_batch=args.max_batch,
            constrained=not args.no_constrained,
        )
    try:
        base = _base_label(args, backend if args.endpoint else None)
        if args.task == "humaneval":
            from openk2.eval import humaneval

            cfg = humaneval.HumanEvalConfig(
                n_samples=args.n_samples,
                ks=tuple(args.k),
                temperature=temp,
                max_tokens=args.max_tokens or 512,
                mode=args.mode,
                reference=args.reference,
                limit=args.limit,
                seed=args.seed,
                workers=args.workers,
            ).validate()
            store = _store(args, "humaneval", base, asdict(cfg))
            result = humaneval.run(_wrap(backend, args, store), cfg, store, **run_kw)
        elif args.task == "gym":
            from openk2.eval import gym

            cfg = gym.GymConfig(
                seed=args.seed,
                n_tasks=args.n_tasks,
                split=args.split,
                temperature=temp,
                max_tokens=args.max_tokens or 512,
                max_turns=args.max_turns,
            )
            if args.envs:
                cfg.envs = list(args.envs)
            cfg.validate()
            store = _store(args, "gym", base, asdict(cfg))
            result = gym.run(_wrap(backend, args, store), cfg, store, **run_kw)
        elif args.task == "safety":
            from openk2.eval import safety

            chosen = {"task": "safety", "strategies": list(args.strategies), "intents": args.intents}
            label = args.name or default_label(base, _source(args), chosen)
            return safety.run_cli(args, backend, label, _source(args), run_kw)
        else:
            from openk2.eval import toolcall_conformance as tcc

            cfg = tcc.ConformanceConfig(
                args.cases, args.seed, args.max_tokens or 512, not args.no_stream, args.only
            )
            store = _store(args, "toolcall", base, asdict(cfg))
            result = tcc.run(_wrap(backend, args, store), cfg, store, **run_kw)
    finally:
        if backend is not None:
            backend.close()
    return _report(result, store)


def _report(result: dict, store: ResultStore) -> int:
    table = result_table(result)
    store.json_path.with_suffix(".md").write_text(table + "\n")
    print(table)
    print(f"\nresults: {store.json_path}", file=sys.stderr)
    samples = store.json_path.with_suffix(".samples.jsonl")  # written by --log-samples
    if samples.is_file():
        print(f"samples: {samples}", file=sys.stderr)
    return 0
