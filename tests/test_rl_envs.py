"""Every verifier against right, wrong, malformed and adversarial answers; the gym interface; splits."""

import json
import time

import pytest
import sympy

from openk2.rl.env import (
    Environment,
    Task,
    extract_answer,
    extract_code,
    filter_by_pass_rate,
    list_envs,
    make_env,
    pass_at_k,
    register_env,
)
from openk2.rl.envs.code import check_many, check_program, load_humaneval
from openk2.rl.envs.puzzles import sudoku_errors

MALFORMED = [None, 42, {"content": "x"}, "", "x" * 200_000, "\\boxed{", "Answer:"]


def _grid_text(grid):
    return "\n".join("".join(map(str, row)) for row in grid)


# --------------------------------------------------------------------------------------------------
# interface, registry, extraction, splits


def test_registry_lists_every_family():
    assert {
        "math",
        "code",
        "game24",
        "sudoku",
        "cryptarithm",
        "instruction",
        "arithmetic",
        "sorting",
        "tool_use",
    } <= set(list_envs())
    with pytest.raises(KeyError, match="available"):
        make_env("no-such-env")
    with pytest.raises(ValueError):
        make_env("arithmetic", min_digits=5, max_digits=2)


def test_register_env_decorator():
    @register_env("test-constant")
    class Constant(Environment):
        def generate(self, rng):
            return Task(
                id=str(rng.random()), messages=[{"role": "user", "content": str(rng.random())}], answer="7"
            )

        def score(self, task, text):
            return float(text.strip() == task.answer), {}

    env = make_env("test-constant")
    obs = env.reset(seed=1)
    assert obs.messages[0]["role"] == "user"
    result = env.step({"role": "assistant", "content": "7"})
    assert result.reward == 1.0 and result.done
    with pytest.raises(RuntimeError):
        env.step({"role": "assistant", "content": "7"})


def test_extraction_convention():
    assert extract_answer("work... \\boxed{1} then \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert extract_answer("thinking\nAnswer: 42\nmore\nANSWER: 43") == "43"
    assert extract_answer("no answer here") is None
    assert extract_answer("\\boxed{unbalanced") is None
    assert extract_code("text\n```python\nx = 1\n```\nand\n```\ny = 2\n```") == "y = 2\n"
    assert extract_code("```js\nlet x\n```") is None


@pytest.mark.parametrize(
    "name", ["arithmetic", "sorting", "math", "game24", "sudoku", "cryptarithm", "instruction"]
)
def test_generation_is_deterministic_and_splits_are_disjoint(name):
    env = make_env(name)
    a, b = env.sample_tasks(20, seed=5), env.sample_tasks(20, seed=5)
    assert [t.id for t in a] == [t.id for t in b]
    assert [t.id for t in env.sample_tasks(20, seed=6)] != [t.id for t in a]
    test = env.sample_tasks(20, seed=5, split="test")
    train_keys = {env.task_key(t) for t in env.sample_tasks(200, seed=1)}
    assert not train_keys & {env.task_key(t) for t in test}
    for task in a[:3]:
        assert task.messages[-1]["role"] == "user" and task.messages[-1]["content"]


@pytest.mark.parametrize(
    "name", ["arithmetic", "sorting", "math", "game24", "sudoku", "cryptarithm", "instruction"]
)
def test_malformed_responses_score_zero_without_raising(name):
    env = make_env(name)
    task = env.sample_tasks(1, seed=0)[0]
    # free-text instructions give partial credit to any text, so only non-text is malformed there
    for bad in MALFORMED[:5] if name == "instruction" else MALFORMED:
        reward, info = env.evaluate(task, bad)
        assert reward == 0.0 and info["reason"], (name, bad)
    env.reset(task=task)
    result = env.step({"role": "assistant"})  # no content at all
    assert result.reward == 0.0 and result.done and "malformed" in result.info["reason"]


def test_pass_at_k_and_difficulty_filter():
    assert pass_at_k(10, 0, 1) == 0.0 and pass_at_k(10, 10, 5) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2)
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)

    env = make_env("arithmetic", min_digits=1, max_digits=4, ops="+")
    tasks = env.sample_tasks(40, seed=0)

    # A deterministic fake policy: right on 1-digit sums, right 1 time in 4 on 2 digits, never beyond.
    def fake_pass_rate(task):
        samples = [
            str(task.answer)
            if (task.metadata["digits"] == 1 or (task.metadata["digits"] == 2 and i == 0))
            else "0"
            for i in range(4)
        ]
        c = sum(env.verify(task, s) for s in samples)
        return pass_at_k(4, int(c), 1)

    kept = filter_by_pass_rate(tasks, fake_pass_rate, low=0.0, high=1.0)
    assert kept and all(t.metadata["digits"] == 2 for t in kept)
    assert all("pass_rate" in t.metadata for t in tasks)
    with pytest.raises(ValueError):
        filter_by_pass_rate(tasks, fake_pass_rate, low=0.8, high=0.2)


# --------------------------------------------------------------------------------------------------
# arithmetic and sorting


def test_arithmetic_verifier():
    env = make_env("arithmetic", min_digits=3, max_digits=3)
    task = env.sample_tasks(1, seed=2)[0]
    assert len(str(task.metadata["a"])) == 3
    right = str(task.answer)
    assert env.verify(task, right) == 1.0
    assert env.verify(task, f" {right}\n") == 1.0
    assert env.verify(task, f"Answer: {right}") == 1.0 and env.verify(task, f"\\boxed{{{right}}}") == 1.0
    assert env.verify(task, str(task.answer + 1)) == 0.0
    for bad in [f"{right} or {task.answer + 1}", f"{right}.0", "1" * 1000, "12e3", f"{right}; import os"]:
        assert env.verify(task, bad) == 0.0, bad


def test_sorting_verifier():
    env = make_env("sorting", min_len=5, max_len=5)
    task = env.sample_tasks(1, seed=0)[0]
    right = " ".join(map(str, task.answer))
    assert (
        env.verify(task, right) == 1.0
        and env.verify(task, "[" + ", ".join(map(str, task.answer)) + "]") == 1.0
    )
    assert (
        env.verify(task, " ".join(map(str, reversed(task.answer)))) == 0.0 or task.answer == task.answer[::-1]
    )
    assert env.verify(task, " ".join(map(str, task.answer[:-1]))) == 0.0  # dropped an element
    assert env.verify(task, right + " 5") == 0.0
    assert env.verify(task, "sorted(xs)") == 0.0


# --------------------------------------------------------------------------------------------------
# math


def test_math_is_checked_symbolically():
    env = make_env("math", problems=[{"question": "What is 1/4 + 1/4?", "answer": "\\frac{1}{2}"}])
    task = env.sample_tasks(1, seed=0)[0]
    for right in [
        "\\boxed{\\frac{1}{2}}",
        "\\boxed{0.5}",
        "so \\boxed{2/4}",
        "Answer: 1/2",
        "\\boxed{\\frac{2}{4}}",
    ]:
        assert env.verify(task, right) == 1.0, right
    for wrong in ["\\boxed{1/3}", "\\boxed{\\frac{1}{2} + 1}", "\\boxed{0.5} wait no \\boxed{2}"]:
        assert env.verify(task, wrong) == 0.0, wrong
    assert env.verify(task, "the answer is one half") == 0.0  # no boxed / Answer line


def test_math_generated_tasks_accept_their_reference():
    env = make_env("math")
    for task in env.sample_tasks(12, seed=4):
        assert env.verify(task, f"\\boxed{{{sympy.latex(task.answer)}}}") == 1.0, task.messages[0]["content"]
        assert env.verify(task, f"\\boxed{{{sympy.latex(task.answer + 1)}}}") == 0.0


def test_math_adversarial_answers_are_cheap_and_zero():
    env = make_env("math", problems=[{"question": "2+2?", "answer": "4"}])
    task = env.sample_tasks(1, seed=0)[0]
    start = time.monotonic()
    for bad in [
        "\\boxed{9^{9^{9^{9}}}}",
        "Answer: 9**9**9**9",
        "\\boxed{" + "1+" * 500 + "1}",
        "\\boxed{\\x}",
        "\\boxed{x}",
    ]:
        assert env.verify(task, bad) == 0.0, bad
    assert time.monotonic() - start < 5


# --------------------------------------------------------------------------------------------------
# puzzles


def test_game24_verifier():
    env = make_env("game24")
    task = env.sample_tasks(1, seed=0)[0]
    assert env.verify(task, f"Answer: {task.answer}") == 1.0  # the generator's own solution
    a, b, c, d = task.metadata["numbers"]
    assert env.verify(task, f"Answer: {a}+{b}+{c}+{d}") == float(a + b + c + d == 24)
    assert env.verify(task, "Answer: 24") == 0.0  # does not use the numbers
    assert env.verify(task, f"Answer: {a}*{b}*{c}*{d}*1") == 0.0  # an extra number
    assert env.verify(task, f"Answer: ({a}+{b}+{c})/({d}-{d})") == 0.0  # division by zero
    for bad in [
        "Answer: __import__('os').system('id')",
        "Answer: (lambda: 24)()",
        f"Answer: {a}**{b}**{c}**{d}",
        "Answer: 2 +",
    ]:
        reward, info = env.evaluate(task, bad)
        assert reward == 0.0 and info["reason"], bad


def test_game24_known_puzzle():
    env = make_env("game24")
    task = Task(id="t", messages=[], metadata={"numbers": [1, 5, 5, 5], "target": 24})
    assert env.verify(task, "Answer: 5*(5-1/5)") == 1.0  # needs exact fractions
    assert env.verify(task, "Answer: (5 × (5 − 1 ÷ 5))") == 0.0  # unicode minus is not accepted
    assert env.verify(task, "Answer: 5 × (5 - 1 ÷ 5) = 24") == 1.0


def test_sudoku_verifier():
    for box, blanks in [(2, 8), (3, 40)]:
        env = make_env("sudoku", box=box, blanks=blanks)
        task = env.sample_tasks(1, seed=3)[0]
        solution = task.answer
        assert sudoku_errors(solution, task.metadata["givens"], box) is None
        assert sum(v == 0 for row in task.metadata["givens"] for v in row) == blanks
        assert env.verify(task, "Here it is:\n" + _grid_text(solution)) == 1.0
        assert env.verify(task, "\n".join(" ".join(map(str, row)) for row in solution)) == 1.0
        broken = [row[:] for row in solution]
        broken[0][0], broken[0][1] = broken[0][1], broken[0][0]  # swap: rows still fine, columns not
        assert env.verify(task, _grid_text(broken)) == 0.0
        assert env.verify(task, _grid_text(solution[:-1])) == 0.0
    # a grid that is a valid sudoku but ignores the givens
    env = make_env("sudoku", box=2, blanks=4)
    t1, t2 = env.sample_tasks(2, seed=0)
    if t1.answer != t2.answer:
        assert env.verify(t1, _grid_text(t2.answer)) == 0.0


def test_cryptarithm_verifier():
    env = make_env("cryptarithm")
    task = env.sample_tasks(1, seed=1)[0]
    right = ", ".join(f"{k}={v}" for k, v in task.answer.items())
    assert env.verify(task, f"Answer: {right}") == 1.0
    letters = list(task.answer)
    swapped = dict(task.answer)
    swapped[letters[0]], swapped[letters[1]] = swapped[letters[1]], swapped[letters[0]]
    assert env.verify(task, "Answer: " + ", ".join(f"{k}={v}" for k, v in swapped.items())) in (0.0, 1.0)
    same = {k: 1 for k in letters}
    assert env.verify(task, "Answer: " + ", ".join(f"{k}={v}" for k, v in same.items())) == 0.0
    assert (
        env.verify(task, "Answer: " + ", ".join(f"{k}={v}" for k, v in list(task.answer.items())[:-1])) == 0.0
    )
    assert env.verify(task, f"Answer: {right}, {letters[0]}=3") == 0.0  # repeated letter
    assert env.verify(task, "Answer: " + ", ".join(f"{k}=12" for k in letters)) == 0.0
    # leading zero is rejected even when the sum holds: 0A + ... built by hand
    t = Task(id="t", messages=[], metadata={"words": ["AB", "C", "AD"]})
    assert env.verify(t, "Answer: A=1, B=2, C=3, D=5") == 1.0
    assert env.verify(t, "Answer: A=0, B=2, C=3, D=5") == 0.0


# --------------------------------------------------------------------------------------------------
# instruction following


def test_instruction_constraints_are_checked_by_code():
    from openk2.rl.envs.instruction import Constraint

    env = make_env("instruction")
    cons = [
        Constraint("include_keywords", ("river", "bridge"), ""),
        Constraint("max_words", 30, ""),
        Constraint("lowercase", None, ""),
        Constraint("bullets", 2, ""),
    ]
    task = Task(id="t", messages=[], metadata={"constraints": cons})
    good = "- the river runs under the bridge\n- water moves in a loop"
    assert env.verify(task, good) == 1.0
    reward, info = env.evaluate(task, good.upper())
    assert reward == 0.75 and info["constraints"]["lowercase:None"] is False
    assert env.verify(task, "- the riverside\n- a bridge") == 0.75  # "riverside" is not the word "river"
    assert make_env("instruction", strict=True).verify(task, good.upper()) == 0.0

    json_task = Task(id="j", messages=[], metadata={"constraints": [Constraint("json", None, "")]})
    assert env.verify(json_task, '{"topic": "volcanoes", "facts": [1, 2]}') == 1.0
    assert env.verify(json_task, '```json\n{"a": 1}\n```') == 1.0
    for bad in ['{"a": 1', "[1, 2]", "{'a': 1}", '{"a": 1} trailing', "NaN"]:
        assert env.verify(json_task, bad) == 0.0, bad

    lang = Task(id="l", messages=[], metadata={"constraints": [Constraint("language", "Russian", "")]})
    assert env.verify(lang, "Вода испаряется и возвращается дождём.") == 1.0
    assert env.verify(lang, "Water evaporates and comes back as rain.") == 0.0


def test_instruction_generated_prompts_state_their_constraints():
    env = make_env("instruction", min_constraints=3, max_constraints=3)
    for task in env.sample_tasks(10, seed=0):
        assert len(task.metadata["constraints"]) == 3
        for c in task.metadata["constraints"]:
            assert c.text in task.messages[0]["content"]


# --------------------------------------------------------------------------------------------------
# code (HumanEval in the sandbox)


@pytest.fixture(scope="module")
def humaneval():
    return load_humaneval()


def test_humaneval_loads_164_problems(humaneval):
    assert len(humaneval) == 164 and humaneval[0]["task_id"] == "HumanEval/0"


def test_code_right_wrong_and_adversarial(humaneval):
    problem = next(p for p in humaneval if p["entry_point"] == "has_close_elements")
    assert check_program(problem, problem["canonical_solution"]).passed
    assert not check_program(problem, "").passed
    assert not check_program(problem, "    return True\n").passed
    adversarial = {
        "reads files": "    return open('/etc/shadow').read() or open('/root/.bashrc').read()\n",
        "opens a socket": "    import socket\n    socket.create_connection(('127.0.0.1', 22), 1)\n",
        "fork bomb": "    import os\n    while True:\n        try:\n            os.fork()\n"
        "        except OSError:\n            pass\n",
        "sleeps forever": "    import time\n    time.sleep(10**6)\n",
        "exits early with 0": "    import os\n    os._exit(0)\n",
        "sys.exit(0)": "    raise SystemExit(0)\n",
        "writes outside": "    open('/tmp/pwned-by-code-env', 'w').write('x')\n    return True\n",
    }
    from openk2.rl.envs.code import SandboxLimits

    limits = SandboxLimits(cpu_seconds=2, wall_seconds=3, max_processes=8)
    for name, completion in adversarial.items():
        result = check_program(problem, completion, limits)
        assert not result.passed and result.reason, name
    import os

    assert not os.path.exists("/tmp/pwned-by-code-env")


def test_code_env_through_the_chat_interface(humaneval):
    env = make_env("code")
    task = env.sample_tasks(1, seed=0, split="test")[0]
    problem = task.metadata["problem"]
    full = problem["prompt"] + problem["canonical_solution"]
    env.reset(task=task)
    result = env.step({"role": "assistant", "content": f"Here you go:\n```python\n{full}```"})
    assert result.done and result.reward == 1.0, result.info
    body_only = f"```python\n{problem['canonical_solution']}```"
    assert env.verify(task, body_only) == 1.0  # a body continuation is accepted too
    assert env.verify(task, "```python\ndef nothing(): pass\n```") == 0.0
    assert env.verify(task, full) == 0.0  # no fenced block
    train_ids = {t.id for t in env.sample_tasks(200, seed=0)}
    assert task.id not in train_ids


@pytest.mark.slow
def test_all_humaneval_canonical_solutions_pass_and_empty_fail(humaneval):
    results = check_many(humaneval, [p["canonical_solution"] for p in humaneval], workers=2)
    failures = [(p["task_id"], r.reason, r.stderr[-300:]) for p, r in zip(humaneval, results) if not r.passed]
    assert not failures
    empty = check_many(humaneval, [""] * len(humaneval), workers=2)
    assert not any(r.passed for r in empty)


# --------------------------------------------------------------------------------------------------
# multi-turn tool use


def _call(i, name, **arguments):
    return {"id": f"c{i}", "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


def _solve_shop(env, obs, retry=True):
    """A scripted agent: search, add the goal items, check out, retrying transient failures."""
    goal = obs.task.answer
    calls = [
        _call(i, "add_to_cart", product_id=pid, quantity=q)
        for i, (pid, q) in enumerate(goal["items"].items())
    ]
    calls.append(_call(99, "checkout", payment_method=goal["payment_method"]))
    transcript = []
    for call in calls:
        for _ in range(20 if retry else 1):
            result = env.step({"role": "assistant", "content": None, "tool_calls": [call]})
            transcript.append(result)
            reply = json.loads(result.messages[0]["content"])
            assert result.messages[0]["role"] == "tool" and result.messages[0]["tool_call_id"] == call["id"]
            if "temporarily unavailable" not in reply.get("error", ""):
                break
    return env.step({"role": "assistant", "content": "Done."}), transcript


def test_tool_use_goal_reached_with_retries():
    env = make_env("tool_use", failure_rate=0.3, max_turns=100)
    tasks = env.sample_tasks(12, seed=0)
    assert {t.metadata["kind"] for t in tasks} == {"named", "cheapest", "two_items"}
    saw_failure = False
    for task in tasks:
        obs = env.reset(task=task)
        assert obs.tools and obs.messages[0]["role"] == "system"
        final, transcript = _solve_shop(env, obs)
        saw_failure |= any("temporarily unavailable" in r.messages[0]["content"] for r in transcript)
        assert final.done and final.reward == 1.0, final.info
    assert saw_failure  # the seeded failures happen


def test_tool_use_wrong_and_malformed_actions():
    env = make_env("tool_use", failure_rate=0.0)
    task = next(t for t in env.sample_tasks(12, seed=1) if t.metadata["kind"] == "named")
    goal_pid, goal_qty = next(iter(task.answer["items"].items()))

    env.reset(task=task)  # answering without doing anything
    assert env.step({"role": "assistant", "content": "Bought!"}).reward == 0.0

    env.reset(task=task)  # wrong product
    other = next(pid for pid in task.metadata["products"] if pid != goal_pid)
    env.step({"role": "assistant", "tool_calls": [_call(0, "add_to_cart", product_id=other, quantity=1)]})
    env.step({"role": "assistant", "tool_calls": [_call(1, "checkout", payment_method="card")]})
    assert env.step({"role": "assistant", "content": "ok"}).reward == 0.0

    env.reset(task=task)  # malformed calls get error turns and change nothing
    bad_calls = [
        {"id": "a", "function": {"name": "add_to_cart", "arguments": "{not json"}},
        {
            "id": "b",
            "function": {
                "name": "add_to_cart",
                "arguments": json.dumps({"product_id": goal_pid, "quantity": -3}),
            },
        },
        {"id": "c", "function": {"name": "rm_rf", "arguments": "{}"}},
        {"id": "d", "function": {"name": "checkout", "arguments": json.dumps({"payment_method": "bitcoin"})}},
        {
            "id": "e",
            "function": {
                "name": "add_to_cart",
                "arguments": json.dumps({"product_id": goal_pid, "quantity": 1, "x": 1}),
            },
        },
        {"id": "f"},
        "not a call",
    ]
    result = env.step({"role": "assistant", "tool_calls": bad_calls})
    assert not result.done and len(result.messages) == len(bad_calls)
    assert all("error" in json.loads(m["content"]) for m in result.messages)
    assert env.world.cart == {} and env.world.orders == []
    result = env.step(
        {"role": "assistant", "tool_calls": [_call(2, "add_to_cart", product_id=goal_pid, quantity=99)]}
    )
    assert "in stock" in json.loads(result.messages[0]["content"])["error"]
    assert env.step("not a dict").reward == 0.0

    env.reset(task=task)  # two orders is not the goal either
    for i, pid in enumerate([goal_pid, other]):
        env.step(
            {
                "role": "assistant",
                "tool_calls": [_call(i, "add_to_cart", product_id=pid, quantity=goal_qty if i == 0 else 1)],
            }
        )
        env.step({"role": "assistant", "tool_calls": [_call(10 + i, "checkout", payment_method="card")]})
    assert env.step({"role": "assistant", "content": "ok"}).reward == 0.0


def test_tool_use_turn_limit():
    env = make_env("tool_use", failure_rate=0.0, max_turns=3)
    env.reset(seed=0)
    for _ in range(2):
        assert not env.step({"role": "assistant", "tool_calls": [_call(0, "view_cart")]}).done
    last = env.step({"role": "assistant", "tool_calls": [_call(0, "view_cart")]})
    assert last.done and last.reward == 0.0 and last.info["reason"] == "turn limit reached"
