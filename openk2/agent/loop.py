"""The agent loop: a model behind any OpenAI-compatible endpoint calls the runtime's tools in its own
workspace until it answers, within budgets on turns and tokens.

Each assistant turn is one streamed chat completion (the official `openai` client). Text is shown as
it arrives; tool calls are assembled from their deltas, given K2 ids (`functions.NAME:IDX`, IDX
counting calls across the conversation, as the chat template and SFT data expect), executed in the
session's workspace, and their results appended as tool messages. The conversation is kept in the
SFT format (`{"messages", "tools", "meta"}`, what `openk2 sft` reads), so a transcript is training data.
Ctrl-C (KeyboardInterrupt) stops the current turn and the conversation stays consistent: a call whose
execution was interrupted is recorded with the result "interrupted by the user"; an interrupted
stream is not recorded at all.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from openk2.tools.toolset import ToolSession, openai_tools

SYSTEM_PROMPT = (
    "You are an assistant that solves tasks with tools. Your tools act in a private workspace directory: "
    "write files, run Python (a persistent interpreter) and shell commands, and draw plots there. "
    "Call tools when they help; when the task is done, answer the user plainly."
)


INTERRUPTED = "Error: interrupted by the user"


@dataclass
class AgentBudget:
    max_turns: int = 10  # assistant turns (one completion each), over the whole session
    max_tokens: int = 16_384  # completion tokens over the whole session
    turn_tokens: int = 1024  # max_tokens of one completion

    def __post_init__(self):
        for name in ("max_turns", "max_tokens", "turn_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


@dataclass
class AgentState:
    messages: list[dict]
    tools: list[dict]
    turns: int = 0
    completion_tokens: int = 0
    prompt_tokens: int = 0
    n_calls: int = 0
    stopped_by: str | None = None  # None while running; answer, max_turns, max_tokens, interrupted, error
    events: list[str] = field(default_factory=list)

    def record(self, meta: dict | None = None) -> dict:
        return {
            "messages": self.messages,
            "tools": self.tools,
            "meta": {
                "source": "openk2 agent",
                "turns": self.turns,
                "completion_tokens": self.completion_tokens,
                "prompt_tokens": self.prompt_tokens,
                "stopped_by": self.stopped_by,
                **(meta or {}),
            },
        }


class Agent:
    def __init__(
        self,
        client,
        model: str,
        session: ToolSession,
        budget: AgentBudget = AgentBudget(),
        tool_names: list[str] | None = None,
        temperature: float = 0.6,
        tool_choice: str = "auto",
        system_prompt: str = SYSTEM_PROMPT,
        out: Callable[[str], None] | None = None,
    ):
        self.client, self.model, self.session, self.budget = client, model, session, budget
        self.temperature, self.tool_choice = temperature, tool_choice
        tools = openai_tools(tool_names)
        self.state = AgentState([{"role": "system", "content": system_prompt}], tools)
        self.out = out or (lambda s: (sys.stdout.write(s), sys.stdout.flush()))

    def run(self, task: str) -> str | None:
        """Add the user's message and loop until the model answers or a budget runs out; the answer."""
        self.state.messages.append({"role": "user", "content": task})
        self.state.stopped_by = None
        try:
            while True:
                if self.state.turns >= self.budget.max_turns:
                    self.state.stopped_by = "max_turns"
                    break
                left = self.budget.max_tokens - self.state.completion_tokens
                if left <= 0:
                    self.state.stopped_by = "max_tokens"
                    break
                message = self._turn(min(self.budget.turn_tokens, left))
                if not message.get("tool_calls"):
                    self.state.messages.append(message)
                    self.state.stopped_by = "answer"
                    return message.get("content")
                results: list[dict] = []
                try:
                    for call in message["tool_calls"]:
                        results.append(self._execute(call))
                finally:  # interrupted or not, every recorded call gets a result
                    for call in message["tool_calls"][len(results) :]:
                        results.append({"role": "tool", "tool_call_id": call["id"], "content": INTERRUPTED})
                    self.state.messages.append(message)
                    self.state.messages.extend(results)
        except KeyboardInterrupt:
            self.state.stopped_by = "interrupted"
            self.out("\n[interrupted]\n")
        self.out(f"\n[stopped: {self.state.stopped_by}]\n")
        return None

    def _turn(self, max_tokens: int) -> dict:
        self.state.turns += 1
        self.out("\nassistant> ")
        stream = self.client.chat.completions.create(
            model=self.model,
            messages=self.state.messages,
            tools=self.state.tools,
            tool_choice=self.tool_choice,
            temperature=self.temperature,
            max_tokens=max_tokens,
            stream=True,
            stream_options={"include_usage": True},
        )
        content: list[str] = []
        calls: dict[int, dict] = {}
        usage = None
        try:
            for chunk in stream:
                if chunk.usage is not None:
                    usage = chunk.usage
                for choice in chunk.choices or []:
                    delta = choice.delta
                    if delta.content:
                        content.append(delta.content)
                        self.out(delta.content)
                    for tc in delta.tool_calls or []:
                        slot = calls.setdefault(tc.index, {"name": "", "arguments": ""})
                        if tc.function is not None:
                            slot["name"] += tc.function.name or ""
                            slot["arguments"] += tc.function.arguments or ""
        finally:
            stream.close()
        text = "".join(content)
        if usage is not None:
            self.state.completion_tokens += usage.completion_tokens
            self.state.prompt_tokens += usage.prompt_tokens
        else:  # an endpoint without usage in streams: count roughly, so the budget still binds
            self.state.completion_tokens += max(1, len(text) // 4)
        message: dict = {"role": "assistant", "content": text}
        if calls:
            message["tool_calls"] = []
            for _, c in sorted(calls.items()):
                call_id = f"functions.{c['name']}:{self.state.n_calls}"
                self.state.n_calls += 1
                message["tool_calls"].append(
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {"name": c["name"], "arguments": c["arguments"]},
                    }
                )
        return message

    def _execute(self, call: dict) -> dict:
        name, raw = call["function"]["name"], call["function"]["arguments"]
        self.out(f"\n[tool {name}({raw[:200]}{'...' if len(raw) > 200 else ''})]\n")
        start = time.monotonic()
        try:
            args = json.loads(raw) if raw.strip() else {}
        except json.JSONDecodeError as e:
            text, is_error = f"Error: arguments are not valid JSON: {e}", True
        else:
            text, is_error = self.session.call(name, args)
        shown = text if len(text) <= 600 else text[:600] + "..."
        self.out(f"[{'error' if is_error else 'result'} in {time.monotonic() - start:.1f}s] {shown}\n")
        return {"role": "tool", "tool_call_id": call["id"], "content": text}
