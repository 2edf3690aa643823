"""`openk2 synth rephrase|tools|trajectories`: the post-training data pipelines from the command line.

Every pipeline talks to one model through the LLM client: `--base-url http://127.0.0.1:8000/v1` (an
`openk2 serve`, vLLM or hosted endpoint) or `--checkpoint DIR` (the in-process engine). Outputs are
JSONL and resumable: rerun the same command after an interruption and it continues.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import tempfile
from pathlib import Path

from openk2.client import LLMClient, ScriptedBackend, make_backend, read_jsonl, run_jsonl


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="pipeline", metavar="PIPELINE", required=True)

    def common(p: argparse.ArgumentParser, needs_model: bool = True) -> None:
        p.add_argument("--out", required=True, help="output JSONL (resumed if it exists)")
        p.add_argument("--base-url", help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
        p.add_argument("--checkpoint", help="checkpoint directory for the in-process engine")
        p.add_argument("--model", default="openk2", help="model name sent to the endpoint")
        p.add_argument("--api-key", default="EMPTY")
        p.add_argument("--concurrency", type=int, default=8)
        p.add_argument("--cache", help="request cache JSONL (default: OUT.cache.jsonl)")
        p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("rephrase", help="style-diverse, fidelity-checked rewrites of documents")
    common(p)
    p.add_argument(
        "--input", required=True, help="JSONL with a 'text' field (and optionally 'id'), or a .txt file"
    )
    p.add_argument("--mode", choices=["knowledge", "math"], default="knowledge")
    p.add_argument("--chunk-chars", type=int, default=2000)
    p.add_argument("--min-similarity", type=float, default=0.75)
    p.add_argument("--judge", action="store_true", help="also ask the model whether the rewrite is faithful")
    p.add_argument(
        "--lexical-fidelity", action="store_true", help="bag-of-words similarity instead of MiniLM"
    )
    p.add_argument("--max-tokens", type=int, default=1024)

    p = sub.add_parser("tools", help="tool repository: MCP imports + synthetic domain evolution")
    common(p)
    p.add_argument("--mcp", action="append", default=[], help="MCP server command line (repeatable)")
    p.add_argument("--workspace", help="workspace for the shipped MCP server (default: a temp dir)")
    p.add_argument("--no-shipped", action="store_true", help="do not import the shipped MCP server's tools")
    p.add_argument("--no-synthetic", action="store_true", help="only import MCP tools (needs no model)")
    p.add_argument("--categories", type=int, default=8)
    p.add_argument("--domains-per-category", type=int, default=4)
    p.add_argument("--tools-per-domain", type=int, default=5)

    p = sub.add_parser("trajectories", help="multi-turn tool-use conversations, judged against rubrics")
    common(p)
    p.add_argument("--tools", required=True, help="tool repository JSONL from `openk2 synth tools`")
    p.add_argument("--agents", type=int, default=8)
    p.add_argument("--tools-per-agent", type=int, default=4)
    p.add_argument("--tasks-per-agent", type=int, default=8)
    p.add_argument("--task-source", choices=["template", "llm"], default="template")
    p.add_argument(
        "--scripted",
        action="store_true",
        help="no model at all: oracle agent on template tasks, template user and tool simulators, rule judge",
    )
    p.add_argument(
        "--workspace", help="workspace of the shipped MCP server for real tools (default: temp dir)"
    )
    p.add_argument("--error-rate", type=float, default=0.1)
    p.add_argument("--partial-rate", type=float, default=0.05)
    p.add_argument("--edge-rate", type=float, default=0.05)
    p.add_argument("--judge-threshold", type=float, default=7.0)
    p.add_argument("--max-steps", type=int, default=8)
    p.add_argument("--agent-max-tokens", type=int, default=1024, help="token budget of each agent turn")


def _client(args) -> LLMClient:
    cache = args.cache or str(Path(args.out).with_suffix(".cache.jsonl"))
    if (args.base_url is None) == (args.checkpoint is None):
        raise ValueError("give exactly one of --base-url (an OpenAI-compatible server) or --checkpoint")
    backend = make_backend(
        args.checkpoint,
        args.base_url,
        api_key=args.api_key,
        served_model=args.model,
        timeout=300.0,
        max_retries=4,
        concurrency=args.concurrency,
    )
    return LLMClient(backend, concurrency=args.concurrency, cache_path=cache)


def _documents(path: str) -> list[dict]:
    p = Path(path)
    if not p.exists():
        raise SystemExit(f"error: input {path} does not exist")
    if p.suffix == ".jsonl":
        docs = read_jsonl(p)
        for i, d in enumerate(docs):
            if not isinstance(d.get("text"), str):
                raise SystemExit(f"error: {path}:{i + 1} has no 'text' string")
            d.setdefault("id", f"doc-{i:06d}")
        return docs
    return [
        {"id": f"{p.stem}-{i:06d}", "text": t}
        for i, t in enumerate(p.read_text().split("\n\n\n"))
        if t.strip()
    ]


async def _rephrase(args) -> int:
    from openk2.data.rephrase import Embedder, RephraseArgs, rephrase_document

    client = _client(args)
    embedder = Embedder(lexical=args.lexical_fidelity)
    kind = "bag-of-words cosine (weaker fallback)" if embedder.kind == "lexical" else "all-MiniLM-L6-v2"
    print(f"fidelity check: {kind}")
    rargs = RephraseArgs(
        mode=args.mode,
        chunk_chars=args.chunk_chars,
        min_similarity=args.min_similarity,
        judge=args.judge,
        max_tokens=args.max_tokens,
        seed=args.seed,
    )

    async def work(doc: dict) -> dict:
        return await rephrase_document(client, doc["id"], doc["text"], rargs, embedder)

    summary = await run_jsonl(
        _documents(args.input), work, args.out, client.stats, "rephrase", workers=args.concurrency
    )
    print(summary)
    print(client.stats.table())
    return 0


async def _tools(args) -> int:
    from openk2.data.tools import (
        EvolveArgs,
        deduplicate,
        evolve_tools,
        import_mcp_tools,
        save_tools,
        shipped_server_command,
    )

    commands = [shlex.split(c) for c in args.mcp]
    if not args.no_shipped:
        ws = args.workspace or tempfile.mkdtemp(prefix="openk2-mcp-")
        commands.insert(0, shipped_server_command(ws))
    tools = []
    for cmd in commands:
        name = "openk2" if cmd[1:3] == ["-m", "openk2.data.mcp_server"] else Path(cmd[0]).name
        got = await import_mcp_tools(cmd, name)
        print(f"imported {len(got)} tools from MCP server {name}: {', '.join(t.name for t in got)}")
        tools += got
    client = None
    if not args.no_synthetic:
        client = _client(args)
        evo = EvolveArgs(args.categories, args.domains_per_category, args.tools_per_domain, seed=args.seed)
        tools += await evolve_tools(client, evo)
    tools, dropped = deduplicate(tools)
    save_tools(tools, args.out)
    n_real = sum(t.real for t in tools)
    print(f"wrote {len(tools)} tools ({n_real} real, {dropped} duplicates dropped) to {args.out}")
    if client is not None:
        print(client.stats.table())
    return 0


async def _trajectories(args) -> int:
    from openk2.data.agents import llm_tasks, make_agents, template_tasks
    from openk2.data.tools import MCPToolbox, load_tools, shipped_server_command
    from openk2.data.trajectories import EpisodeConfig, Judge, LLMAgent, OracleAgent, run_episode

    tools = load_tools(args.tools)
    agents = make_agents(tools, args.agents, args.tools_per_agent, args.seed)
    by_name = {a.name: a for a in agents}
    if args.scripted:
        if args.task_source != "template":
            raise SystemExit(
                "error: --scripted needs --task-source template (the oracle follows reference plans)"
            )
        # The stats and cache machinery still run; no request ever reaches this backend.
        client = LLMClient(ScriptedBackend(lambda r: RuntimeError("scripted mode makes no model requests")))
        sim_client, policy, judge = None, OracleAgent(), Judge(None)
    else:
        client = _client(args)
        sim_client, policy, judge = (
            client,
            LLMAgent(client, seed=args.seed, max_tokens=args.agent_max_tokens),
            Judge(client, args.judge_threshold),
        )
    tasks = []
    for a in agents:
        if args.task_source == "template":
            tasks += template_tasks(a, args.tasks_per_agent, args.seed)
        else:
            tasks += await llm_tasks(client, a, args.tasks_per_agent, args.seed)
    cfg = EpisodeConfig(args.max_steps, args.seed, args.error_rate, args.partial_rate, args.edge_rate)
    toolbox = None
    if any(t.real for a in agents for t in a.tools):
        ws = args.workspace or tempfile.mkdtemp(prefix="openk2-traj-")
        toolbox = await MCPToolbox(shipped_server_command(ws), "openk2").__aenter__()
    try:

        async def work(item: dict) -> dict:
            from openk2.data.agents import Task

            task = Task.from_dict(item["task"])
            return await run_episode(task, by_name[task.agent], policy, sim_client, judge, cfg, toolbox)

        items = [{"id": t.id, "task": t.to_dict()} for t in tasks]
        summary = await run_jsonl(
            items, work, args.out, client.stats, "trajectories", workers=args.concurrency
        )
    finally:
        if toolbox is not None:
            await toolbox.__aexit__(None, None, None)
    print(summary)
    print(client.stats.table())
    return 0


def run(args: argparse.Namespace) -> int:
    fn = {"rephrase": _rephrase, "tools": _tools, "trajectories": _trajectories}[args.pipeline]
    try:
        return asyncio.run(fn(args))
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
