"""`openk2 chat CHECKPOINT`: talk to a checkpoint in the terminal, tokens printed as they come.

Runs the engine in-process (no server). /reset clears the conversation, /exit (or Ctrl-D) quits.
"""

from __future__ import annotations

import argparse
import sys

from openk2.serve.cli import add_engine_arguments, load_engine
from openk2.serve.sampling import K2_DEFAULT_TEMPERATURE, SamplingParams
from openk2.tokenizer.chat import encode_chat


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    parser.add_argument("--system", default=None, help="system prompt (default: K2's)")
    parser.add_argument("--temperature", type=float, default=K2_DEFAULT_TEMPERATURE)
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--seed", type=int, default=None)


def run(args: argparse.Namespace) -> int:
    engine = load_engine(args.checkpoint, 1, args.max_seq_len, args.dtype, args.compile)
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages: list[dict] = list(system)
    print("openk2 chat: /reset clears the conversation, /exit quits.", flush=True)
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
        prompt = encode_chat(engine.tokenizer, messages, add_generation_prompt=True).ids
        room = engine.max_seq_len - len(prompt) + 1
        if room < 1:
            print("(the conversation no longer fits the context; /reset to start over)")
            messages.pop()
            continue
        params = SamplingParams(
            max_tokens=min(args.max_tokens, room), temperature=args.temperature, seed=args.seed
        )
        sys.stdout.write("k2> ")
        reply: list[str] = []

        def show(ev, reply: list[str] = reply) -> None:
            reply.append(ev.text)
            sys.stdout.write(ev.text)
            sys.stdout.flush()

        try:
            out = engine.submit(prompt, params, on_event=show)
            while not out.finished:
                engine.step()
        except KeyboardInterrupt:
            engine.abort(out.request_id)
            while not out.finished:
                engine.step()
            print(" [interrupted]")
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})
