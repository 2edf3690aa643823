"""Does SFT on synthetic tool-use conversations teach a small model to emit well-formed K2 tool calls?

    python experiments/sft_toolcalls.py [--init CKPT] [--steps 150] [--out runs/sft-toolcalls]

1. Tool repository: the shipped MCP server's real tools plus synthetic tools grown by
   `evolve_tools` (categories -> domains -> tools). No capable model is available offline, so the
   "designer" answering the evolution prompts is a scripted template (ScriptedBackend): the
   pipeline code (JSON extraction, validation, dedup) is the real one, the tool ideas are templates.
2. Agents and template tasks; trajectories from the oracle agent (it executes each task's reference
   plan), template user and tool simulators (seeded errors / partial / edge results), real sandboxed
   execution for the MCP tools, and the rule judge. Agents are split: tasks of held-out agents are
   never trained on.
3. Measure on held-out prompts with the in-process engine (greedy): the share of replies with at
   least one well-formed call (complete markers, JSON object arguments, an offered tool, arguments
   valid against its schema) and the share whose first call names the task's first tool.
4. `openk2 sft` (MuonClip) on the training trajectories, then measure again.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import random
import tempfile
import time
from pathlib import Path

import jsonschema
import torch

from openk2.data.agents import make_agents, template_tasks
from openk2.data.llm import ChatRequest, LLMClient, ScriptedBackend
from openk2.data.tools import EvolveArgs, MCPToolbox, evolve_tools, import_mcp_tools, shipped_server_command
from openk2.data.trajectories import EpisodeConfig, Judge, OracleAgent, run_episode

DOMAINS = {
    "productivity": ["calendar", "notes", "task tracker"],
    "finance": ["invoices", "currency exchange", "expense reports"],
    "travel": ["flight booking", "hotel search", "car rental"],
    "e-commerce": ["product catalog", "order tracking", "coupons"],
    "health": ["fitness log", "medication reminders"],
    "education": ["course catalog", "quiz grading"],
}
NOUN = {d: d.split()[-1].rstrip("s") for ds in DOMAINS.values() for d in ds}


def designer(req: ChatRequest) -> str:
    """Scripted answers to the evolution prompts (see the module docstring)."""
    prompt = req.messages[-1]["content"]
    if prompt.startswith("Category:"):
        category = prompt.split(":", 1)[1].split(".")[0].strip()
        return json.dumps(DOMAINS.get(category, []))
    domain = prompt.split(":", 1)[1].split("(")[0].strip()
    noun = NOUN.get(domain, "item").replace("-", "_").replace(" ", "_")
    return json.dumps(
        [
            {
                "name": f"search_{noun}s",
                "description": f"Search the {domain} for {noun}s matching a query.",
                "parameters": {
                    "type": "object",
                    "properties": {
                        "query": {"type": "string", "description": "what to look for"},
                        "limit": {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": 20,
                            "description": "max results",
                        },
                    },
                    "required": ["query"],
                },
            },
            {
                "name": f"create_{noun}",
                "description": f"Create a new {noun} in the {domain}.",
                "parameters": {
                    "type": "object",
                    "properties": {
                        "title": {"type": "string", "description": f"title of the {noun}"},
                        "date": {"type": "string", "description": "date, YYYY-MM-DD"},
                    },
                    "required": ["title", "date"],
                },
            },
            {
                "name": f"delete_{noun}",
                "description": f"Delete a {noun} of the {domain} by its id.",
                "parameters": {
                    "type": "object",
                    "properties": {"id": {"type": "string", "description": f"the {noun} id"}},
                    "required": ["id"],
                },
            },
        ]
    )


async def build_data(out: Path, n_agents: int, tasks_per_agent: int, seed: int) -> tuple[Path, list[dict]]:
    ws = Path(tempfile.mkdtemp(prefix="openk2-sft-exp-"))
    real = await import_mcp_tools(shipped_server_command(ws), "openk2")
    real = [t for t in real if t.name in ("python", "read_file", "write_file")]
    client = LLMClient(ScriptedBackend(designer))
    synthetic = await evolve_tools(
        client, EvolveArgs(categories=len(DOMAINS), domains_per_category=3, tools_per_domain=3)
    )
    tools = real + synthetic
    print(f"tool repository: {len(real)} real + {len(synthetic)} synthetic tools")
    agents = make_agents(tools, n_agents, tools_per_agent=3, seed=seed)
    rng = random.Random(seed)
    rng.shuffle(agents)
    held_out = {a.name for a in agents[: max(2, n_agents // 5)]}
    judge, cfg = Judge(None), EpisodeConfig(seed=seed)
    train, evals, rejected = [], [], 0
    async with MCPToolbox(shipped_server_command(ws), "openk2") as box:
        for agent in agents:
            for task in template_tasks(agent, tasks_per_agent, seed):
                if agent.name in held_out:
                    evals.append({"agent": agent, "task": task})
                    continue
                try:
                    train.append(await run_episode(task, agent, OracleAgent(), None, judge, cfg, box))
                except Exception as e:  # Rejected by the judge
                    rejected += 1
                    print(f"rejected {task.id}: {e}")
    path = out / "train.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in train))
    print(f"trajectories: {len(train)} kept, {rejected} rejected; {len(evals)} held-out prompts")
    return path, evals


def well_formed_rate(ckpt: str, evals: list[dict], max_tokens: int = 80) -> dict:
    from openk2.model.transformer import Transformer
    from openk2.serve.engine import Engine
    from openk2.serve.sampling import SamplingParams
    from openk2.tokenizer.chat import encode_chat
    from openk2.tokenizer.tokenizer import K2Tokenizer
    from openk2.tokenizer.toolcalls import parse_tool_calls

    tok = K2Tokenizer.from_pretrained(ckpt)
    engine = Engine(Transformer.from_pretrained(ckpt), tok, max_batch=16, max_seq_len=1024)
    prompts, specs = [], []
    for e in evals:
        agent, task = e["agent"], e["task"]
        msgs = [
            {"role": "system", "content": agent.system_prompt},
            {"role": "user", "content": task.instruction},
        ]
        prompts.append(encode_chat(tok, msgs, agent.openai_tools(), add_generation_prompt=True).ids)
        specs.append((agent, task))
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, skip_special_tokens=False)
    outs = engine.generate(prompts, params)
    good = right_tool = any_marker = 0
    for out, (agent, task) in zip(outs, specs):
        parsed = parse_tool_calls(out.completions[0].text, agent.openai_tools())
        any_marker += bool(parsed.tool_calls)
        ok = []
        for c in parsed.tool_calls:
            tool = agent.tool(c.name)
            valid = c.complete and c.valid_json and c.offered and tool is not None
            if valid:
                try:
                    jsonschema.validate(json.loads(c.arguments), tool.parameters)
                except jsonschema.ValidationError:
                    valid = False
            ok.append(valid)
        good += any(ok)
        right_tool += (
            bool(parsed.tool_calls) and ok[0] and parsed.tool_calls[0].name == task.rubric.expected_tools[0]
        )
    n = len(evals)
    return {
        "prompts": n,
        "well_formed": good / n,
        "right_first_tool": right_tool / n,
        "any_call": any_marker / n,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--init", help="checkpoint to fine-tune (default: a fresh `small`-preset model)")
    ap.add_argument("--out", default="runs/sft-toolcalls")
    ap.add_argument("--agents", type=int, default=40)
    ap.add_argument("--tasks-per-agent", type=int, default=10)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data, evals = asyncio.run(build_data(out, args.agents, args.tasks_per_agent, args.seed))
    init = args.init
    if init is None:
        from openk2.config import ModelConfig
        from openk2.model.transformer import Transformer
        from openk2.tokenizer.tokenizer import K2Tokenizer

        # The `tiny` architecture with the default BPE vocabulary and 1024 positions: the `small` preset
        # trained at ~120 tokens/s on the 2 shared CPU cores this was measured on, too slow for a
        # ~10 minute experiment.
        tok = K2Tokenizer.default()
        cfg = dataclasses.replace(
            ModelConfig.from_preset("tiny"), vocab_size=8192, max_position_embeddings=1024, rope_scaling=None,
            bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
        )  # fmt: skip
        init = str(out / "init")
        Transformer(cfg).save_pretrained(init)
        tok.save_pretrained(init)
        print("no --init: starting from a randomly initialised tiny-architecture model (vocabulary 8192)")
    before = well_formed_rate(init, evals)
    print("before SFT:", before)
    from openk2.train.sft import SFTConfig, sft

    t0 = time.perf_counter()
    summary = sft(
        SFTConfig(
            data=str(data), init=init, out_dir=str(out / "sft"), steps=args.steps, batch_size=args.batch_size,
            seq_len=args.seq_len, lr=args.lr, val_fraction=0.05, eval_every=50, save_every=args.steps,
            seed=args.seed, device="cpu", tensorboard=False,
        ),
        resume=False,
    )  # fmt: skip
    print("sft:", json.dumps({k: v for k, v in summary.items()}), f"({time.perf_counter() - t0:.0f} s)")
    after = well_formed_rate(summary["checkpoint"], evals)
    print("after SFT:", after)
    result = {"before": before, "after": after, "sft": summary, "args": vars(args)}
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
