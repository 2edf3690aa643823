"""Multi-turn lookup: answer a question whose answer only a tool knows.

Each task draws its own random table of keys (short strings: lowercase letters by default, or any
`alphabet`) and values (numbers), and asks for the value of one key. The table is never shown to the
model: it lives in the task's metadata and only the `lookup(key)` tool reads it. So the value cannot be
guessed or memorised (a fresh table per task, about one chance in `10**value_digits` by luck) and a
policy succeeds only by calling the tool with the right key and copying its answer back. That makes it
the smallest environment where tool use is necessary rather than optional, and a clean check that RL
teaches a model to use a tool.

Calls arrive as OpenAI `tool_calls` (parsed from K2's tool-call tokens by the rollout worker) and
run through `run_tool_call` like tool_use's; results go back as `tool` turns (the value as plain
text, or `{"error": ...}` for an unknown key or a malformed call, so the model can retry). The
episode ends at the first assistant turn without tool calls, whose text is the answer (a bare value,
or `\\boxed{...}` / `Answer:`), or after `max_turns`. Reward: 1 when the answer equals the looked-up
key's value, else 0.
"""

from __future__ import annotations

import random
import string

from openk2.rl.env import (
    Environment,
    Observation,
    StepResult,
    Task,
    ToolError,
    check_arguments,
    extract_answer,
    register_env,
    run_tool_call,
)

LOOKUP_TOOL = {
    "type": "function",
    "function": {
        "name": "lookup",
        "description": "Value of a key.",
        "parameters": {
            "type": "object",
            "properties": {"key": {"type": "string"}},
            "required": ["key"],
        },
    },
}
SCHEMAS = {"lookup": LOOKUP_TOOL["function"]["parameters"]}


@register_env("lookup")
class LookupEnv(Environment):
    """`table_size` keys of `key_len` characters drawn from `alphabet`, values of `value_digits` digits;
    one key is asked. The alphabet decides how hard the key is to copy: a 0.43M-parameter model learns
    to copy digit keys into its call but neither lowercase nor capital letters (docs/rl_tool_use.md)."""

    multi_turn = True

    def __init__(
        self,
        table_size: int = 4,
        key_len: int = 3,
        value_digits: int = 3,
        max_turns: int = 4,
        alphabet: str = string.ascii_lowercase,
    ):
        super().__init__()
        if not isinstance(alphabet, str) or len(set(alphabet)) != len(alphabet) or not alphabet.isalnum():
            raise ValueError(f"alphabet must be distinct letters or digits, got {alphabet!r}")
        if not 1 <= table_size <= 1000 or not 1 <= key_len <= 12 or not 1 <= value_digits <= 12:
            raise ValueError(
                f"need 1 <= table_size <= 1000, 1 <= key_len <= 12, 1 <= value_digits <= 12; got "
                f"{table_size}, {key_len}, {value_digits}"
            )
        if table_size > len(alphabet) ** key_len or max_turns < 1:
            raise ValueError(
                f"need table_size <= len(alphabet)**key_len and max_turns >= 1, got {table_size}, {max_turns}"
            )
        self.table_size, self.key_len, self.value_digits = table_size, key_len, value_digits
        self.max_turns, self.alphabet = max_turns, alphabet
        self.turns = 0
        self.lookups: list[str] = []  # keys the episode looked up, in order

    def generate(self, rng: random.Random) -> Task:
        table: dict[str, str] = {}
        while len(table) < self.table_size:
            key = "".join(rng.choice(self.alphabet) for _ in range(self.key_len))
            low = 10 ** (self.value_digits - 1) if self.value_digits > 1 else 0
            table.setdefault(key, str(rng.randint(low, 10**self.value_digits - 1)))
        key = rng.choice(sorted(table))
        question = f"What is the value of {key}?"
        return Task(
            id=f"lookup:{key}:{table[key]}:{rng.randrange(2**31)}",
            messages=[{"role": "user", "content": question}],
            answer=table[key],
            tools=[LOOKUP_TOOL],
            metadata={"key": key, "table": table},
        )

    def reset(self, seed: int | None = None, task: Task | None = None, split: str = "train") -> Observation:
        obs = super().reset(seed=seed, task=task, split=split)
        self.turns, self.lookups = 0, []
        return obs

    def lookup(self, name: str, arguments: dict) -> str:
        """The tool: the value of `arguments["key"]` in this task's table."""
        check_arguments(name, arguments, SCHEMAS)
        key = arguments["key"].strip()
        self.lookups.append(key)
        table = self.task.metadata["table"]
        if key not in table:
            raise ToolError(f"no key {key!r}")
        return table[key]

    def step(self, assistant_message: dict) -> StepResult:
        if self.task is None or self.done:
            raise RuntimeError("step() called without reset() or after the episode ended")
        self.turns += 1
        info = {"turns": self.turns, "lookups": list(self.lookups)}
        if not isinstance(assistant_message, dict):
            return self._finish([], 0.0, {**info, "reason": "malformed: assistant message is not a dict"})
        calls = assistant_message.get("tool_calls") or []
        if not isinstance(calls, list):
            return self._finish([], 0.0, {**info, "reason": "malformed: tool_calls is not a list"})
        if not calls:  # the answer
            reward, verdict = self.evaluate(self.task, assistant_message.get("content"))
            return self._finish([], reward, {**info, **verdict, "lookups": list(self.lookups)})
        replies = [run_tool_call(call, i, self.lookup) for i, call in enumerate(calls)]
        if self.turns >= self.max_turns:
            return self._finish(replies, 0.0, {**info, "reason": "turn limit reached"})
        return StepResult(0.0, False, replies, {**info, "lookups": list(self.lookups)})

    def _finish(self, messages: list[dict], reward: float, info: dict) -> StepResult:
        self.done = True
        return StepResult(reward, True, messages, info)

    def score(self, task: Task, text: str) -> tuple[float, dict]:
        """The verifier: the answer (boxed / `Answer:` part, else the whole text) equals the value."""
        found = extract_answer(text)
        got = (found if found is not None else text).strip()
        ok = got == task.answer
        return float(ok), {"reason": None if ok else f"wrong: {got[:40]!r}, the value is {task.answer}"}
