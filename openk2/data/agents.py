"""Agents (a system prompt plus a subset of the tool repository) and tasks with explicit rubrics.

A rubric is what makes rejection sampling possible later: the judge checks a trajectory against the
task's success criteria, its expected tool-use pattern (which tools, in which order) and its
checkpoints (facts the conversation must establish). Tasks range from a single call to multi-step
chains where a later call uses an earlier one's output.

Two task sources share the same dataclasses: an LLM writes tasks for an agent (`llm_tasks`), or
`template_tasks` builds them from the tool schemas alone (concrete argument values drawn from the
schema, a reference plan of calls). Template tasks need no model, which is what the SFT acceptance
experiment uses; the docs say so.
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass, field

from openk2.client import ChatRequest, LLMClient, Rejected, extract_json
from openk2.data.tools import Tool


@dataclass
class Rubric:
    success_criteria: list[str]
    expected_tools: list[
        str
    ]  # the tool-use pattern: these tools, called in this order (others may interleave)
    checkpoints: list[str] = field(default_factory=list)  # strings the trajectory must contain


@dataclass
class Agent:
    name: str
    system_prompt: str
    tools: list[Tool]

    def openai_tools(self) -> list[dict]:
        return [t.to_openai() for t in self.tools]

    def tool(self, name: str) -> Tool | None:
        return next((t for t in self.tools if t.name == name), None)


@dataclass
class Task:
    id: str
    agent: str
    instruction: str  # what the user wants, in the user's voice
    difficulty: str  # "simple" | "multi-step"
    rubric: Rubric
    plan: list[dict] = field(default_factory=list)  # reference calls [{name, arguments}] (template tasks)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Task:
        return cls(**{**d, "rubric": Rubric(**d["rubric"])})


def make_agents(tools: list[Tool], n: int, tools_per_agent: int = 4, seed: int = 0) -> list[Agent]:
    """Agents whose tool sets come from one domain where possible (a coherent product), topped up from
    the rest of the repository so that agents must also choose *not* to call some tools."""
    if not tools:
        raise ValueError("the tool repository is empty")
    rng = random.Random(seed)
    by_domain: dict[str, list[Tool]] = {}
    for t in tools:
        by_domain.setdefault(t.domain or t.category or "general", []).append(t)
    domains = sorted(by_domain)
    agents = []
    for i in range(n):
        domain = domains[i % len(domains)]
        own = list(by_domain[domain])
        rng.shuffle(own)
        chosen = own[:tools_per_agent]
        others = [t for t in tools if t not in chosen]
        rng.shuffle(others)
        chosen += others[: max(0, tools_per_agent - len(chosen))]
        # The tools themselves are declared by the chat template (the tool_declare turn): the prompt
        # only sets the role and the rules, so it does not repeat every schema.
        prompt = (
            f"You are an assistant for {domain}. Call a tool when it helps, with arguments that match "
            f"its schema; read the result and tell the user the outcome plainly, including failures."
        )
        agents.append(
            Agent(
                name=f"agent-{i:04d}-{re.sub(r'[^a-z0-9]+', '-', domain.lower())}",
                system_prompt=prompt,
                tools=chosen,
            )
        )
    return agents


# ----------------------------------------------------------------------------------------------------
# Template tasks: no model needed

WORDS = ["alpha", "harbor", "maple", "orbit", "quartz", "summit", "tango", "violet", "willow", "zephyr"]
CITIES = ["Paris", "Tokyo", "Lagos", "Lima", "Oslo", "Pune", "Austin", "Seoul"]


def example_value(name: str, schema: dict, rng: random.Random):
    """A plausible concrete value for one parameter, from its schema (enum, type, bounds, name hints)."""
    if "enum" in schema and schema["enum"]:
        return rng.choice(schema["enum"])
    typ = schema.get("type")
    if isinstance(typ, list):
        typ = next((t for t in typ if t != "null"), "string")
    if "anyOf" in schema and not typ:
        return example_value(name, schema["anyOf"][0], rng)
    if typ == "integer":
        lo, hi = schema.get("minimum", 1), schema.get("maximum", 100)
        return rng.randint(int(lo), int(max(lo, min(hi, lo + 99))))
    if typ == "number":
        lo = schema.get("minimum", 0)
        return round(rng.uniform(lo, lo + 100), 2)
    if typ == "boolean":
        return rng.random() < 0.5
    if typ == "array":
        return [
            example_value(name, schema.get("items", {"type": "string"}), rng)
            for _ in range(rng.randint(1, 2))
        ]
    if typ == "object":
        props = schema.get("properties", {})
        return {k: example_value(k, v, rng) for k, v in props.items() if k in schema.get("required", props)}
    lname = name.lower()
    if "code" in lname:
        return f"print({rng.randint(2, 99)} * {rng.randint(2, 99)})"
    if "command" in lname:
        return rng.choice(["ls", "echo hello", "date +%Y", "wc -l notes.txt"])
    if "path" in lname or "file" in lname:
        return f"{rng.choice(WORDS)}.txt"
    if "city" in lname or "location" in lname:
        return rng.choice(CITIES)
    if "date" in lname:
        return f"2025-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    if "email" in lname:
        return f"{rng.choice(WORDS)}@example.com"
    if "id" in lname:
        return f"{rng.choice(WORDS)[:3]}-{rng.randint(100, 999)}"
    return f"{rng.choice(WORDS)} {rng.choice(WORDS)}"


def example_arguments(tool: Tool, rng: random.Random, all_optional: bool = False) -> dict:
    props = tool.parameters.get("properties", {})
    required = set(tool.parameters.get("required", []))
    return {
        k: example_value(k, v, rng)
        for k, v in props.items()
        if k in required or all_optional or rng.random() < 0.3
    }


def _describe_call(tool: Tool, args: dict) -> str:
    desc = tool.description.rstrip(".")
    desc = desc[0].lower() + desc[1:] if desc else tool.name
    if not args:
        return desc
    return (
        desc
        + " with "
        + ", ".join(f"{k} = {v!r}" if not isinstance(v, str) else f"{k} = {v}" for k, v in args.items())
    )


def template_tasks(agent: Agent, n: int, seed: int = 0, multi_step: float = 0.3) -> list[Task]:
    """n tasks for the agent: one call, or (with probability multi_step) two calls in a fixed order."""
    rng = random.Random(f"{agent.name}:{seed}")
    tasks = []
    for i in range(n):
        steps = 2 if rng.random() < multi_step and len(agent.tools) > 1 else 1
        chosen = rng.sample(agent.tools, steps)
        plan = [{"name": t.name, "arguments": example_arguments(t, rng)} for t in chosen]
        parts = [_describe_call(t, p["arguments"]) for t, p in zip(chosen, plan)]
        instruction = "Please " + (parts[0] if steps == 1 else f"first {parts[0]}, then {parts[1]}") + "."
        checkpoints = [
            str(v)
            for p in plan
            for v in p["arguments"].values()
            if isinstance(v, (str, int)) and not isinstance(v, bool)
        ][:3]
        rubric = Rubric(
            success_criteria=[f"calls {t.name} with the values the user gave" for t in chosen]
            + ["reports the outcome (or the failure) to the user"],
            expected_tools=[t.name for t in chosen],
            checkpoints=checkpoints,
        )
        tasks.append(
            Task(
                f"{agent.name}-t{i:03d}",
                agent.name,
                instruction,
                "multi-step" if steps > 1 else "simple",
                rubric,
                plan,
            )
        )
    return tasks


# ----------------------------------------------------------------------------------------------------
# LLM-written tasks

TASK_PROMPT = """You write evaluation tasks for a tool-using assistant.
Assistant's tools (OpenAI JSON): {tools}
Write {n} tasks, from simple (one tool call) to multi-step (several calls, later ones using earlier results).
Answer with a JSON array; each element has:
  "instruction": what the user asks, in their own words, with every concrete value the tools need,
  "difficulty": "simple" or "multi-step",
  "success_criteria": list of short statements a judge can check,
  "expected_tools": tool names in the order they should be called,
  "checkpoints": short literal strings (values, ids) the conversation must contain."""


async def llm_tasks(client: LLMClient, agent: Agent, n: int, seed: int = 0) -> list[Task]:
    """Tasks written by the model; each is validated (known tools, non-empty fields) or dropped."""
    import json

    req = ChatRequest(
        messages=[
            {"role": "user", "content": TASK_PROMPT.format(tools=json.dumps(agent.openai_tools()), n=n)}
        ],
        temperature=0.8,
        max_tokens=2048,
        seed=seed,
        tag="tasks",
    )
    out = extract_json((await client.chat(req)).content)
    if not isinstance(out, list):
        raise Rejected("not_a_list")
    names = {t.name for t in agent.tools}
    tasks = []
    for i, spec in enumerate(out[:n]):
        try:
            if (
                not isinstance(spec, dict)
                or not isinstance(spec.get("instruction"), str)
                or not spec["instruction"].strip()
            ):
                raise Rejected("no_instruction")
            expected = spec.get("expected_tools") or []
            if not isinstance(expected, list) or not expected or not set(expected) <= names:
                raise Rejected("unknown_tools")
            rubric = Rubric(
                success_criteria=[str(s) for s in spec.get("success_criteria") or []]
                or ["completes the request"],
                expected_tools=[str(e) for e in expected],
                checkpoints=[str(c) for c in spec.get("checkpoints") or []],
            )
        except Rejected as r:
            client.stats.rejected[f"tasks:{r.reason}"] += 1
            continue
        difficulty = "multi-step" if spec.get("difficulty") == "multi-step" or len(expected) > 1 else "simple"
        tasks.append(
            Task(f"{agent.name}-l{seed}-{i:03d}", agent.name, spec["instruction"].strip(), difficulty, rubric)
        )
        client.stats.accepted["tasks"] += 1
    return tasks
