"""Does SFT on synthetic tool-use conversations teach a small model to emit well-formed K2 tool calls?

    python experiments/sft_toolcalls.py [--init CKPT] [--steps 360] [--out runs/sft-toolcalls] [--docs]

The result is written to OUT/result.json; --docs also copies it to docs/sft_toolcalls.json (the
committed result), --result PATH to any other file.

1. Tool repository: the shipped MCP server's real tools plus synthetic tools grown by
   `evolve_tools` (categories -> domains -> tools). No capable model is available offline, so the
   "designer" answering the evolution prompts is a scripted template (ScriptedBackend): the
   pipeline code (JSON extraction, validation, dedup) is the real one, the tool ideas are templates.
   The designer writes compact schemas (one-line descriptions, typed parameters without prose), so a
   whole conversation, tool declaration included, fits in a few hundred tokens.
2. Agents (one domain's tools each) and template tasks; trajectories from the oracle agent (it executes
   each task's reference plan), template user and tool simulators (seeded errors / partial / edge
   results), real sandboxed execution for the MCP tools, and the rule judge.
3. Two held-out sets, neither trained on:
   * held-out prompts: the last tasks of every training agent (new requests and argument values for
     tools the model was trained on; a task whose reference plan equals a training task's is dropped);
   * held-out agents: every agent of a few held-out domains, whose tool names appear in no training
     conversation (checked), so a call is right only if the model copies the name from the declaration.
   The prompt is the held-out trajectory's system and first user turn, exactly as in training.
4. Measure with the in-process engine, greedy, unconstrained: the share of replies with a well-formed
   first call (complete markers, JSON object arguments, an offered tool, arguments valid against its
   schema), naming the reference plan's first tool, and with exactly the reference arguments. With the
   tool-call grammar forced (what `tool_choice="required"` does in `openk2 serve`) a call is
   well-formed by construction unless max_tokens cuts it, so there only tool choice and argument
   values are informative.
5. `openk2 sft` (MuonClip) on the training trajectories, then measure again.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import re
import shutil
import tempfile
import time
from pathlib import Path

import jsonschema
import torch

from openk2.checkpoint import load_model, save_model
from openk2.client import ChatRequest, LLMClient, Rejected, ScriptedBackend
from openk2.data.agents import Agent, Task, make_agents, template_tasks
from openk2.data.tools import EvolveArgs, evolve_tools, import_mcp_tools, shipped_server_command
from openk2.data.trajectories import EpisodeConfig, Judge, OracleAgent, run_episode

DOMAINS = {
    "productivity": ["calendar", "notes", "task tracker"],
    "finance": ["invoices", "currency exchange", "expense reports"],
    "travel": ["flight booking", "hotel search", "car rental"],
    "e-commerce": ["product catalog", "order tracking", "coupons"],
    "health": ["fitness log", "medication reminders"],
    "education": ["course catalog", "quiz grading"],
}
# One distinct noun per domain, so every domain's tool names are its own (held-out domains then have
# tool names that no training conversation contains).
NOUN = {
    "calendar": "event", "notes": "note", "task tracker": "task", "invoices": "invoice",
    "currency exchange": "rate", "expense reports": "expense", "flight booking": "flight",
    "hotel search": "hotel", "car rental": "car", "product catalog": "product", "order tracking": "order",
    "coupons": "coupon", "fitness log": "workout", "medication reminders": "reminder",
    "course catalog": "course", "quiz grading": "quiz",
}  # fmt: skip
REAL_TOOLS = ("python", "read_file", "write_file")


def designer(req: ChatRequest) -> str:
    """Scripted answers to the evolution prompts (see the module docstring)."""
    prompt = req.messages[-1]["content"]
    if prompt.startswith("Category:"):
        category = prompt.split(":", 1)[1].split(".")[0].strip()
        return json.dumps(DOMAINS.get(category, []))
    domain = prompt.split(":", 1)[1].split("(")[0].strip()
    noun = NOUN[domain]
    string = {"type": "string"}

    def tool(name: str, description: str, properties: dict, required: list[str]) -> dict:
        schema = {"type": "object", "properties": properties, "required": required}
        return {"name": name, "description": description, "parameters": schema}

    search = {"query": string, "limit": {"type": "integer", "minimum": 1, "maximum": 20}}
    return json.dumps(
        [
            tool(f"search_{noun}s", f"Search {domain} for {noun}s matching a query.", search, ["query"]),
            tool(
                f"create_{noun}",
                f"Create a new {noun} in {domain}.",
                {"title": string, "date": string},
                ["title", "date"],
            ),
            tool(f"delete_{noun}", f"Delete one {noun} from {domain} by its id.", {"id": string}, ["id"]),
        ]
    )


@dataclasses.dataclass
class Prompt:
    """One held-out prompt: the trajectory's opening turns, its tools and the reference first call."""

    messages: list[dict]  # system + first user turn
    tools: list[dict]
    expected_name: str
    expected_args: dict


async def build_data(args: argparse.Namespace, out: Path) -> tuple[Path, dict[str, list[Prompt]], dict]:
    ws = Path(tempfile.mkdtemp(prefix="openk2-sft-exp-"))
    real = await import_mcp_tools(shipped_server_command(ws), "openk2")
    real = [t for t in real if t.name in REAL_TOOLS]
    client = LLMClient(ScriptedBackend(designer))
    synthetic = await evolve_tools(
        client, EvolveArgs(categories=len(DOMAINS), domains_per_category=3, tools_per_domain=3)
    )
    tools = real + synthetic
    domains = sorted({t.domain for t in tools})
    agents = make_agents(tools, args.agents_per_domain * len(domains), args.tools_per_agent, seed=args.seed)
    rng = random.Random(args.seed)
    held_domains = set(rng.sample(sorted(d for d in domains if d != "openk2"), args.heldout_domains))
    judge, cfg = Judge(None), EpisodeConfig(seed=args.seed)
    train, rejected = [], 0
    prompts: dict[str, list[Prompt]] = {"held-out prompts": [], "held-out agents": []}
    held: list[tuple[str, Agent, Task]] = []  # (set, agent, task), played after the training tasks
    train_plans: set[str] = set()

    async def play(agent: Agent, task: Task) -> dict | None:
        nonlocal rejected
        try:
            return await run_episode(task, agent, OracleAgent(), None, judge, cfg)  # a workspace per episode
        except Rejected as e:
            rejected += 1
            print(f"rejected {task.id}: {e}")
            return None

    for agent in agents:
        if any(agent.name.endswith("-" + re.sub(r"[^a-z0-9]+", "-", d)) for d in held_domains):
            held += [
                ("held-out agents", agent, t) for t in template_tasks(agent, args.tasks_per_agent, args.seed)
            ]
            continue
        tasks = template_tasks(agent, args.tasks_per_agent + args.heldout_tasks, args.seed)
        for task in tasks[: args.tasks_per_agent]:
            train_plans.add(json.dumps(task.plan, sort_keys=True))
            if (record := await play(agent, task)) is not None:
                train.append(record)
        held += [("held-out prompts", agent, t) for t in tasks[args.tasks_per_agent :]]
    duplicates = 0
    for split, agent, task in held:
        if json.dumps(task.plan, sort_keys=True) in train_plans:
            duplicates += 1  # the same request was trained on: not held out
            continue
        if (record := await play(agent, task)) is not None:
            first = record["messages"][2]["tool_calls"][0]["function"]
            prompts[split].append(
                Prompt(record["messages"][:2], record["tools"], first["name"], json.loads(first["arguments"]))
            )
    trained_names = {t["function"]["name"] for r in train for t in r["tools"]}
    unseen = {t["function"]["name"] for p in prompts["held-out agents"] for t in p.tools}
    if trained_names & unseen:
        raise RuntimeError(f"held-out agents' tools were trained on: {sorted(trained_names & unseen)}")
    path = out / "train.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in train))
    info = {
        "tools": {"real": len(real), "synthetic": len(synthetic)},
        "agents": len(agents),
        "heldout_domains": sorted(held_domains),
        "train_trajectories": len(train),
        "rejected_by_judge": rejected,
        "heldout_dropped_as_duplicates": duplicates,
        **{split: len(p) for split, p in prompts.items()},
    }  # fmt: skip
    print("data:", json.dumps(info))
    return path, prompts, info


def measure(ckpt: str, sets: dict[str, list[Prompt]], max_tokens: int, constrained: bool) -> dict:
    """Greedy replies to every held-out prompt; rates of well-formed / right-tool / exact first calls."""
    from openk2.serve.engine import Engine
    from openk2.serve.sampling import SamplingParams
    from openk2.tokenizer.chat import encode_chat
    from openk2.tokenizer.tokenizer import K2Tokenizer
    from openk2.tokenizer.toolcalls import parse_tool_calls

    tok = K2Tokenizer.from_pretrained(ckpt)
    engine = Engine(load_model(ckpt), tok, max_batch=16, max_seq_len=1024)
    results = {}
    for split, prompts in sets.items():
        texts = [""] * len(prompts)
        groups: dict[str, list[int]] = {}  # prompts sharing a tool set share a grammar: one batch each
        for i, p in enumerate(prompts):
            groups.setdefault(json.dumps(p.tools, sort_keys=True) if constrained else "", []).append(i)
        for members in groups.values():
            tools = prompts[members[0]].tools
            params = SamplingParams(
                max_tokens=max_tokens, temperature=0.0, skip_special_tokens=False,
                grammar=engine.grammars.tool_calls(tools) if constrained else None,
            )  # fmt: skip
            ids = [
                encode_chat(tok, prompts[i].messages, prompts[i].tools, add_generation_prompt=True).ids
                for i in members
            ]
            for i, o in zip(members, engine.generate(ids, params)):
                texts[i] = o.completions[0].text
        counts = dict.fromkeys(("any_call", "well_formed", "right_first_tool", "exact_first_call"), 0)
        for text, p in zip(texts, prompts):
            calls = parse_tool_calls(text, p.tools).tool_calls
            counts["any_call"] += bool(calls)
            if not calls:
                continue
            c = calls[0]
            schema = next(
                (t["function"]["parameters"] for t in p.tools if t["function"]["name"] == c.name), None
            )
            ok = c.complete and c.valid_json and c.offered and schema is not None
            if ok:
                try:
                    jsonschema.validate(json.loads(c.arguments), schema)
                except jsonschema.ValidationError:
                    ok = False
            counts["well_formed"] += ok
            counts["right_first_tool"] += ok and c.name == p.expected_name
            counts["exact_first_call"] += (
                ok and c.name == p.expected_name and json.loads(c.arguments) == p.expected_args
            )
        n = len(prompts)
        results[split] = {
            "prompts": n,
            **{k: round(v / n, 4) for k, v in counts.items()},
            "samples": [
                {"user": p.messages[1]["content"], "reply": t[:300]} for p, t in zip(prompts[:3], texts)
            ],
        }
    return results


def loss_curve(run_dir: Path, every: int = 10) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("kind") == "train"]
    return {
        "train": [
            [r["step"], round(r["loss"], 4)] for r in train if r["step"] % every == 0 or r is train[-1]
        ],
        "eval": [[r["step"], round(r["loss"], 4)] for r in records if r.get("kind") == "eval"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--init", help="checkpoint to fine-tune (default: a fresh tiny-architecture model)")
    ap.add_argument("--out", default="runs/sft-toolcalls")
    ap.add_argument("--result", default=None, help="also copy the result JSON here")
    ap.add_argument("--docs", action="store_true", help="also copy it to docs/sft_toolcalls.json")
    ap.add_argument("--agents-per-domain", type=int, default=2)
    ap.add_argument("--tools-per-agent", type=int, default=3)
    ap.add_argument("--tasks-per-agent", type=int, default=10, help="trained on, per training agent")
    ap.add_argument("--heldout-tasks", type=int, default=3, help="held-out prompts per training agent")
    ap.add_argument("--heldout-domains", type=int, default=3)
    ap.add_argument(
        "--hidden-size", type=int, default=128, help="of the fresh model (the tiny preset has 64)"
    )
    ap.add_argument("--steps", type=int, default=360)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=896)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t_start = time.perf_counter()
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data, sets, data_info = asyncio.run(build_data(args, out))
    init = args.init
    if init is None:
        from openk2.config import ModelConfig
        from openk2.model.transformer import Transformer
        from openk2.tokenizer.tokenizer import K2Tokenizer

        # The `tiny` architecture (3 layers, MLA, 8 routed experts), 128 wide by default, with the
        # default 8192-token BPE vocabulary and 1024 positions; `small` is too slow for a ~10 minute
        # run on 2 shared cores.
        tok = K2Tokenizer.default()
        cfg = dataclasses.replace(
            ModelConfig.from_preset("tiny"), vocab_size=8192, hidden_size=args.hidden_size,
            max_position_embeddings=1024, rope_scaling=None, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
        )  # fmt: skip
        init = str(out / "init")
        save_model(Transformer(cfg), init)
        tok.save_pretrained(init)
        print(f"no --init: a random tiny-architecture model (hidden {args.hidden_size}, vocab 8192)")
    t0 = time.perf_counter()
    before = {
        mode: measure(init, sets, args.max_tokens, mode == "constrained") for mode in ("free", "constrained")
    }
    print(
        "before SFT:",
        json.dumps(
            {
                m: {s: {k: v for k, v in r.items() if k != "samples"} for s, r in b.items()}
                for m, b in before.items()
            }
        ),
    )
    eval_seconds = time.perf_counter() - t0
    from openk2.train.sft import SFTConfig, sft

    shutil.rmtree(out / "sft", ignore_errors=True)  # each experiment run starts fresh
    summary = sft(
        SFTConfig(
            data=str(data), init=init, out_dir=str(out / "sft"), steps=args.steps, batch_size=args.batch_size,
            seq_len=args.seq_len, lr=args.lr, val_fraction=0.05, eval_every=25, save_every=args.steps,
            seed=args.seed, device="cpu", tensorboard=False,
        ),
        resume=False,
    )  # fmt: skip
    load_after_sft = os.getloadavg()
    print("sft:", json.dumps(summary))
    t0 = time.perf_counter()
    after = {
        mode: measure(summary["checkpoint"], sets, args.max_tokens, mode == "constrained")
        for mode in ("free", "constrained")
    }
    eval_seconds += time.perf_counter() - t0
    seconds = {"total": time.perf_counter() - t_start, "sft": summary["seconds"], "measure": eval_seconds}
    load = {"after_sft_1_5_15min": load_after_sft, "end_1_5_15min": os.getloadavg(), "cpus": os.cpu_count()}
    result = {
        "before": before,
        "after": after,
        "sft": summary,
        "curve": loss_curve(out / "sft"),
        "data": data_info,
        "args": vars(args),
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "load_average": load,
        "torch_threads": torch.get_num_threads(),
    }
    text = json.dumps(result, indent=1)
    (out / "result.json").write_text(text)
    if args.docs:
        args.result = str(Path(__file__).resolve().parents[1] / "docs" / "sft_toolcalls.json")
    if args.result:
        Path(args.result).write_text(text + "\n")
    for mode in ("free", "constrained"):
        for split in sets:
            b, a = before[mode][split], after[mode][split]
            print(
                f"{mode:11s} {split:16s} "
                + "  ".join(
                    f"{k} {b[k]:.2f}->{a[k]:.2f}"
                    for k in ("any_call", "well_formed", "right_first_tool", "exact_first_call")
                )
            )
    print(f"total {result['seconds']['total']} s, load average {result['load_average']}")


if __name__ == "__main__":
    main()
