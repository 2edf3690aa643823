"""Multi-turn tool-use trajectories: a simulated user, the agent model, simulated (or real) tools, and a
judge that keeps only trajectories meeting the task's rubric (K2 report, section 3.1.1).

    user simulator (persona) -> agent (system prompt + tools) <-> tools -> ... -> judge -> JSONL

* `UserSimulator`: speaks the task in a persona's voice, then answers the agent until satisfied. With a
  client it is an LLM; without, it uses the task's words with a persona-flavoured frame and ends the
  conversation after the agent's first final answer.
* `ToolSimulator`: a world model for synthetic tools. It keeps per-episode state (what was created,
  changed, looked up), validates arguments against the tool's JSON Schema, and draws a seeded outcome
  for every call: success, error, partial result or edge case (e.g. empty results). With a client the
  LLM writes the result given state and outcome; without, a template does.
* Real tools (imported from MCP) run for real through `MCPToolbox` (the shipped server executes code
  in `openk2.sandbox`).
* `Judge`: rule checks that need no model (expected tool pattern in order, schema-valid arguments,
  checkpoints present, a final answer) and, with a client, an LLM score against the rubric. A
  trajectory is written only when every check passes: this is rejection sampling.
* Agents: `LLMAgent` (the agent model through the LLM client) or `OracleAgent`, a scripted agent that
  executes a template task's reference plan (retrying a failed call once). The oracle is for building
  SFT data without a capable model; its trajectories still go through the real tool simulator, real
  tool execution and the judge.

Output records are `{"messages": [...], "tools": [...], "meta": {...}}`: OpenAI-shaped messages whose
tool calls carry K2 ids (`functions.NAME:IDX`, IDX counting calls in the conversation), which
`openk2.tokenizer.chat.encode_chat` renders in the K2 wire format.
"""

from __future__ import annotations

import json
import random
import zlib
from dataclasses import dataclass, field

import jsonschema

from openk2.client import ChatRequest, ChatResult, LLMClient, LLMError, Rejected, ToolCallOut, extract_json
from openk2.data.agents import Agent, Task
from openk2.data.tools import MCPToolbox, Tool

PERSONAS = [
    ("busy professional", "terse, wants results fast, no small talk", "{t} Quick, please."),
    (
        "curious student",
        "polite, asks why things work, writes full sentences",
        "Hi! Could you help me? {t} Thanks!",
    ),
    ("non-native speaker", "simple words, short sentences, sometimes unsure", "Hello. I need help. {t}"),
    (
        "meticulous engineer",
        "precise, double-checks values, mentions constraints",
        "{t} Make sure the values are exact.",
    ),
    (
        "retired teacher",
        "friendly and chatty, explains context",
        "Good morning! I was wondering if you could help. {t}",
    ),
]

DONE = "[DONE]"


# ----------------------------------------------------------------------------------------------------
# User simulator

USER_SYSTEM = """You play a user talking to an AI assistant. Persona: {persona} ({style}).
Your goal: {goal}
Speak only as the user, in the persona's voice; give the concrete values from the goal when asked.
When the assistant has done what you wanted (or clearly cannot), reply with exactly {done}."""


@dataclass
class UserSimulator:
    client: LLMClient | None
    persona: tuple[str, str, str]
    seed: int = 0
    max_followups: int = 2
    followups: int = 0

    async def first_message(self, task: Task) -> str:
        if self.client is None:
            return self.persona[2].format(t=task.instruction)
        text = await self._say(
            task, [{"role": "user", "content": "Start the conversation: state your request."}]
        )
        # The user must still give the values the rubric checks for; a paraphrase that drops them
        # would make a correct agent fail, so fall back to the task's own words.
        if not text or any(c.lower() not in text.lower() for c in task.rubric.checkpoints):
            return self.persona[2].format(t=task.instruction)
        return text

    async def reply(self, task: Task, conversation: list[dict]) -> str | None:
        """The user's next message, or None when the user is done."""
        if self.client is None or self.followups >= self.max_followups:
            return None
        # Seen from the simulator, roles flip: the assistant's words are its "user" input.
        flipped = [
            {"role": "user" if m["role"] == "assistant" else "assistant", "content": m.get("content") or ""}
            for m in conversation
            if m["role"] in ("user", "assistant") and (m.get("content") or "").strip()
        ]
        text = await self._say(task, flipped)
        if not text or DONE in text:
            return None
        self.followups += 1
        return text

    async def _say(self, task: Task, messages: list[dict]) -> str:
        system = USER_SYSTEM.format(
            persona=self.persona[0], style=self.persona[1], goal=task.instruction, done=DONE
        )
        req = ChatRequest(
            [{"role": "system", "content": system}, *messages],
            temperature=0.8,
            max_tokens=256,
            seed=self.seed,
            tag="user",
        )
        return (await self.client.chat(req)).content.strip()


# ----------------------------------------------------------------------------------------------------
# Tool simulator (world model) and executor

TOOL_SYSTEM = """You simulate the backend of a software tool. Tool spec (JSON): {spec}
Current world state (JSON): {state}
The call's outcome MUST be: {outcome}.
Answer with one JSON object: {{"result": <what the tool returns>, "state": <the updated world state>}}.
Keep results realistic and consistent with the state; never mention that this is a simulation."""

OUTCOMES = {
    "success": "success: return a complete, correct result",
    "error": "error: the call fails (service unavailable, not found, permission denied, rate limited...)",
    "partial": "partial: only part of the requested data is returned, and the result says so",
    "edge": "edge case: a valid but unusual result (empty list, zero, boundary value, duplicate entry)",
}
ERRORS = [
    "service unavailable (503)",
    "rate limit exceeded, retry later",
    "upstream timeout",
    "resource locked by another request",
]


@dataclass
class ToolSimulator:
    client: LLMClient | None
    seed: int
    error_rate: float = 0.1
    partial_rate: float = 0.05
    edge_rate: float = 0.05
    state: dict = field(default_factory=dict)  # per episode: one simulator per episode
    outcomes: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.rng = random.Random(self.seed)

    def draw(self) -> str:
        u = self.rng.random()
        if u < self.error_rate:
            return "error"
        if u < self.error_rate + self.partial_rate:
            return "partial"
        if u < self.error_rate + self.partial_rate + self.edge_rate:
            return "edge"
        return "success"

    async def call(self, tool: Tool, args: dict) -> str:
        try:
            jsonschema.validate(args, tool.parameters)
        except jsonschema.ValidationError as e:
            self.outcomes.append("invalid_args")
            return json.dumps({"error": f"invalid arguments: {e.message}"})
        outcome = self.draw()
        self.outcomes.append(outcome)
        if self.client is None:
            return self._template(tool, args, outcome)
        spec = json.dumps(tool.to_openai()["function"])
        req = ChatRequest(
            [
                {
                    "role": "system",
                    "content": TOOL_SYSTEM.format(
                        spec=spec, state=json.dumps(self.state), outcome=OUTCOMES[outcome]
                    ),
                },
                {"role": "user", "content": f"Call: {tool.name}({json.dumps(args, ensure_ascii=False)})"},
            ],
            temperature=0.7,
            max_tokens=512,
            seed=self.rng.randrange(1 << 30),
            tag="tool_sim",
        )
        try:
            out = extract_json((await self.client.chat(req)).content)
        except Rejected:
            raise Rejected("tool_sim_no_json") from None
        if not isinstance(out, dict) or "result" not in out:
            raise Rejected("tool_sim_bad_shape")
        if isinstance(out.get("state"), dict):
            self.state = out["state"]
        return (
            out["result"] if isinstance(out["result"], str) else json.dumps(out["result"], ensure_ascii=False)
        )

    def _template(self, tool: Tool, args: dict, outcome: str) -> str:
        """No model: a result that echoes the call and remembers it in the episode state."""
        records = self.state.setdefault(tool.name, [])
        if outcome == "error":
            return json.dumps({"error": self.rng.choice(ERRORS)})
        if outcome == "edge":
            return json.dumps({"status": "ok", "results": [], "note": "no matching records"})
        record = {"id": f"{tool.name[:3]}-{len(records) + 1:03d}", **args}
        records.append(record)
        if outcome == "partial":
            keep = dict(list(record.items())[: max(1, len(record) // 2)])
            return json.dumps({"status": "partial", "result": keep, "note": "some fields unavailable"})
        return json.dumps({"status": "ok", "result": record}, ensure_ascii=False)


class ToolExecutor:
    """Routes a call: real MCP tools execute for real, synthetic ones go to the episode's simulator."""

    def __init__(self, simulator: ToolSimulator, toolbox: MCPToolbox | None = None):
        self.simulator = simulator
        self.toolbox = toolbox

    async def call(self, tool: Tool, arguments: str) -> str:
        try:
            args = json.loads(arguments)
        except json.JSONDecodeError:
            self.simulator.outcomes.append("bad_json")
            return json.dumps({"error": "arguments are not valid JSON"})
        if not isinstance(args, dict):
            return json.dumps({"error": "arguments must be a JSON object"})
        if tool.real:
            if self.toolbox is None:
                raise LLMError(f"tool {tool.name} is real but no MCP server is connected")
            text, is_error = await self.toolbox.call(tool.name, args)
            self.simulator.outcomes.append("real_error" if is_error else "real")
            return text
        return await self.simulator.call(tool, args)


# ----------------------------------------------------------------------------------------------------
# Agents


class LLMAgent:
    def __init__(self, client: LLMClient, temperature: float = 0.6, seed: int = 0, max_tokens: int = 1024):
        self.client, self.temperature, self.seed, self.max_tokens = client, temperature, seed, max_tokens

    async def act(self, agent: Agent, task: Task, messages: list[dict]) -> ChatResult:
        req = ChatRequest(
            messages,
            tools=agent.openai_tools(),
            temperature=self.temperature,
            max_tokens=self.max_tokens,
            seed=self.seed,
            tag="agent",
        )
        return await self.client.chat(req)


class OracleAgent:
    """Scripted agent for template tasks: calls the reference plan one step per turn, retries a call
    whose result is an error once, then reports every result to the user."""

    async def act(self, agent: Agent, task: Task, messages: list[dict]) -> ChatResult:
        if not task.plan:
            raise ValueError(f"task {task.id} has no reference plan; the oracle agent needs template tasks")
        results = [m for m in messages if m["role"] == "tool"]
        step, attempts = 0, 0  # walk the results so far: which plan step is next, tried how often
        for r in results:
            if _failed(r):
                attempts += 1
                if attempts < 2:
                    continue
            step, attempts = step + 1, 0
        if step < len(task.plan):
            return _call(task.plan[step], len(results), "That failed; trying once more." if attempts else "")
        summary = []
        for m in results:
            name = m["tool_call_id"].split(".", 1)[1].rsplit(":", 1)[0]
            body = (m.get("content") or "")[:300]
            if _failed(m):
                summary.append(f"{name} failed: {body}")
            else:
                summary.append(f"{name} returned {body}")
        return ChatResult(content="Here is what I did. " + " ".join(summary), finish_reason="stop")


def _failed(tool_message: dict) -> bool:
    """A tool result that reports an error (simulated: {"error": ...}; sandboxed: nonzero returncode)."""
    try:
        out = json.loads(tool_message.get("content") or "")
    except json.JSONDecodeError:
        return (tool_message.get("content") or "").startswith("Error")
    return isinstance(out, dict) and ("error" in out or out.get("returncode", 0) != 0)


def _call(step: dict, index: int, content: str) -> ChatResult:
    arguments = json.dumps(step["arguments"], ensure_ascii=False)
    call = ToolCallOut(f"functions.{step['name']}:{index}", step["name"], arguments)
    return ChatResult(content=content, tool_calls=[call], finish_reason="tool_calls")


# ----------------------------------------------------------------------------------------------------
# Judge

JUDGE_SYSTEM = """You grade a conversation between a user and a tool-using assistant against a rubric.
Rubric (JSON): {rubric}
Score 1-10 how well the assistant met the success criteria, followed the expected tool-use pattern and
handled tool failures honestly.
Answer with one JSON object: {{"score": <1-10>, "reason": "<one sentence>"}}."""


@dataclass
class Verdict:
    passed: bool
    reasons: list[str]
    score: float | None = None


def _is_subsequence(expected: list[str], called: list[str]) -> bool:
    it = iter(called)
    return all(name in it for name in expected)


class Judge:
    def __init__(self, client: LLMClient | None = None, threshold: float = 7.0):
        self.client, self.threshold = client, threshold

    async def judge(self, agent: Agent, task: Task, messages: list[dict]) -> Verdict:
        reasons = []
        calls = [c for m in messages if m["role"] == "assistant" for c in m.get("tool_calls") or []]
        called = [c["function"]["name"] for c in calls]
        if not _is_subsequence(task.rubric.expected_tools, called):
            reasons.append("tool_pattern")
        for c in calls:
            tool = agent.tool(c["function"]["name"])
            if tool is None:
                reasons.append("unknown_tool")
                continue
            try:
                jsonschema.validate(json.loads(c["function"]["arguments"]), tool.parameters)
            except (json.JSONDecodeError, jsonschema.ValidationError):
                reasons.append("bad_arguments")
        text = json.dumps(messages, ensure_ascii=False).lower()
        if any(str(cp).lower() not in text for cp in task.rubric.checkpoints):
            reasons.append("checkpoint")
        last = messages[-1]
        if last["role"] != "assistant" or last.get("tool_calls") or not (last.get("content") or "").strip():
            reasons.append("no_final_answer")
        score = None
        if self.client is not None and not reasons:
            transcript = "\n".join(
                f"{m['role'].upper()}: {m.get('content') or ''}"
                + "".join(
                    f" [call {c['function']['name']}({c['function']['arguments']})]"
                    for c in m.get("tool_calls") or []
                )
                for m in messages
                if m["role"] != "system"
            )
            req = ChatRequest(
                [
                    {
                        "role": "system",
                        "content": JUDGE_SYSTEM.format(rubric=json.dumps(task.rubric.__dict__)),
                    },
                    {"role": "user", "content": transcript},
                ],
                temperature=0.0,
                max_tokens=200,
                tag="judge",
            )
            out = extract_json((await self.client.chat(req)).content)
            try:
                score = float(out["score"])
            except (TypeError, KeyError, ValueError):
                raise Rejected("judge_bad_shape") from None
            if score < self.threshold:
                reasons.append("judge_score")
        return Verdict(not reasons, reasons, score)


# ----------------------------------------------------------------------------------------------------
# One episode


@dataclass
class EpisodeConfig:
    max_steps: int = 8  # assistant turns
    seed: int = 0
    error_rate: float = 0.1
    partial_rate: float = 0.05
    edge_rate: float = 0.05


async def run_episode(
    task: Task,
    agent: Agent,
    policy: LLMAgent | OracleAgent,
    sim_client: LLMClient | None,
    judge: Judge,
    cfg: EpisodeConfig,
    toolbox: MCPToolbox | None = None,
) -> dict:
    """Play one conversation; return its record, or raise Rejected with the judge's reasons."""
    episode_seed = zlib.crc32(f"{cfg.seed}:{task.id}".encode())  # stable across processes (resume, cache)
    rng = random.Random(episode_seed)
    persona = PERSONAS[rng.randrange(len(PERSONAS))]
    user = UserSimulator(sim_client, persona, seed=episode_seed)
    tools = ToolExecutor(
        ToolSimulator(sim_client, episode_seed, cfg.error_rate, cfg.partial_rate, cfg.edge_rate), toolbox
    )
    messages: list[dict] = [{"role": "system", "content": agent.system_prompt}]
    messages.append({"role": "user", "content": await user.first_message(task)})
    n_calls = 0
    for _ in range(cfg.max_steps):
        resp = await policy.act(agent, task, messages)
        msg = {"role": "assistant", "content": resp.content}
        if resp.tool_calls:
            msg["tool_calls"] = []
            for c in resp.tool_calls:
                call_id = f"functions.{c.name}:{n_calls}"  # K2 ids count calls across the conversation
                n_calls += 1
                msg["tool_calls"].append(ToolCallOut(call_id, c.name, c.arguments).to_openai())
        messages.append(msg)
        if resp.tool_calls:
            for c in msg["tool_calls"]:
                tool = agent.tool(c["function"]["name"])
                if tool is None:
                    result = json.dumps({"error": f"unknown tool {c['function']['name']}"})
                else:
                    result = await tools.call(tool, c["function"]["arguments"])
                messages.append({"role": "tool", "tool_call_id": c["id"], "content": result})
            continue
        follow = await user.reply(task, messages)
        if follow is None:
            break
        messages.append({"role": "user", "content": follow})
    verdict = await judge.judge(agent, task, messages)
    if not verdict.passed:
        raise Rejected(verdict.reasons[0])
    return {
        "messages": messages,
        "tools": agent.openai_tools(),
        "meta": {
            "task": task.id,
            "agent": agent.name,
            "difficulty": task.difficulty,
            "persona": persona[0],
            "tool_outcomes": tools.simulator.outcomes,
            "judge_score": verdict.score,
        },
    }
