"""`openk2 chat MODEL`: talk to a checkpoint in the terminal, tokens printed as they come.

Runs the engine in-process (no server). /reset clears the conversation, /exit (or Ctrl-D) quits.
When the conversation outgrows the context, the oldest turns are dropped (the system prompt stays)
and a note says so; a reply cut short by --max-tokens or the context ends with a marker.
"""

from __future__ import annotations

import argparse
import sys

from openk2.serve.cli import add_engine_arguments, load_engine
from openk2.serve.sampling import K2_DEFAULT_TEMPERATURE, SamplingParams
from openk2.tokenizer.chat import encode_chat


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    parser.set_defaults(max_batch=1)  # one conversation: one cache slot unless asked for more
    parser.add_argument("--system", default=None, help="system prompt (default: K2's)")
    parser.add_argument("--temperature", type=float, default=K2_DEFAULT_TEMPERATURE, help="0 = greedy")
    parser.add_argument("--max-tokens", type=int, default=512, help="longest reply, in tokens")
    parser.add_argument("--seed", type=int, default=None)


def fit_context(engine, messages: list[dict], n_fixed: int, want: int) -> tuple[list[int], int]:
    """Drop the oldest turns after the first `n_fixed` messages (the system prompt) until the prompt
    leaves room for `want` reply tokens, or only the newest user message is left. Returns the prompt
    ids and how many messages were dropped (`messages` is shortened in place)."""
    dropped = 0
    while True:
        prompt = encode_chat(engine.tokenizer, messages, add_generation_prompt=True).ids
        room = engine.max_seq_len - len(prompt) + 1
        if room >= want or len(messages) <= n_fixed + 1:
            return prompt, dropped
        del messages[n_fixed]
        dropped += 1
        while len(messages) > n_fixed + 1 and messages[n_fixed]["role"] != "user":
            del messages[n_fixed]  # a turn starts with the user's message
            dropped += 1


def run(args: argparse.Namespace) -> int:
    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    engine = load_engine(
        args.model,
        args.max_batch,
        args.max_seq_len,
        args.dtype,
        args.compile,
        prefix_cache_tokens=args.prefix_cache_tokens,
    )
    SamplingParams(temperature=args.temperature).validate(engine.vocab_size)  # a bad value fails now
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages: list[dict] = list(system)
    print("openk2 chat: /reset clears the conversation, /exit quits.", flush=True)
    # Room kept for a reply before old turns go: the whole --max-tokens when it fits, else half.
    want = min(args.max_tokens, max(1, engine.max_seq_len // 2))
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if line.strip() == "/exit":
            return 0
        if line.strip() == "/reset":
            messages = list(system)
            print("(conversation cleared)")
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        prompt, dropped = fit_context(engine, messages, len(system), want)
        if dropped:
            print(f"(context full: dropped the {dropped} oldest messages)")
        room = engine.max_seq_len - len(prompt) + 1
        if room < 1:
            print(
                f"(this message alone is {len(prompt)} tokens; the context holds {engine.max_seq_len}: "
                "shorten it, or restart with a larger --max-seq-len)"
            )
            messages.pop()
            continue
        limit = min(args.max_tokens, room)
        params = SamplingParams(max_tokens=limit, temperature=args.temperature, seed=args.seed)
        sys.stdout.write("k2> ")
        reply: list[str] = []

        def show(ev, reply: list[str] = reply) -> None:
            reply.append(ev.text)
            sys.stdout.write(ev.text)
            sys.stdout.flush()

        out = engine.submit(prompt, params, on_event=show)
        try:
            while not out.finished:
                engine.step()
        except KeyboardInterrupt:
            engine.abort(out.request_id)
            while not out.finished:
                engine.step()
            sys.stdout.write(" [interrupted]")
        if out.completions[0].finish_reason == "length":
            why = f"--max-tokens {args.max_tokens}" if limit == args.max_tokens else "the context is full"
            sys.stdout.write(f" [cut: {limit} tokens, {why}]")
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})
