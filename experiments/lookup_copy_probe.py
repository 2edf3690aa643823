"""Why the tool-use worked example needs digit keys: which copies the SFT warm-up learns.

    python experiments/lookup_copy_probe.py                              # capital-letter keys (default)
    python experiments/lookup_copy_probe.py --alphabet 0123456789 --key-len 3
    python experiments/lookup_copy_probe.py --quick                      # seconds (the tests run it)

The `lookup` episode asks the model to copy twice: the asked key from the question into the tool call,
and the tool's reply into the answer. This trains the example's model with the example's SFT
(experiments/rl_tool_use.py: same demonstrations, batch, learning rate, float32 Newton-Schulz) for
`--steps` steps, then reports

* the loss of every assistant token, averaged over 64 training episodes: copied tokens are near 0
  nats, a token the model cannot see is near ln(alphabet size) nats (3.26 for 26 letters);
* where each attention head looks from the two positions that must copy (the one predicting the
  first key character of the call, the one predicting the first digit of the answer): its three
  strongest positions and weights.

Results go to OUT/lookup_copy_probe.json and a bar plot of the per-token loss.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
import rl_tool_use as example  # noqa: E402

import openk2.model.mla as mla  # noqa: E402
from openk2.model.transformer import Transformer  # noqa: E402
from openk2.rl.env import make_env  # noqa: E402
from openk2.rl.trainer import lm_batch  # noqa: E402
from openk2.tokenizer import K2Tokenizer  # noqa: E402
from openk2.tokenizer.chat import encode_chat  # noqa: E402

NAME = "lookup_copy_probe"


def attention_probabilities(model: Transformer, ids: list[int]) -> list[torch.Tensor]:
    """One forward pass on the eager attention path; each layer's softmax output (1, H, S, S)."""
    probs: list[torch.Tensor] = []

    def recording(scores: torch.Tensor) -> torch.Tensor:
        p = original(scores)
        probs.append(p.detach())
        return p

    original = mla.softmax
    layers = [layer.self_attn for layer in model.layers.values()]
    for attn in layers:
        attn.record_max_logits = True  # the eager path, which computes the probabilities explicitly
    try:
        with mock.patch.object(mla, "softmax", recording), torch.no_grad():
            model(torch.tensor([ids]))
    finally:
        for attn in layers:
            attn.record_max_logits = False
    return probs


def probe(model: Transformer, tokenizer, tasks: list) -> dict:
    """Per-token loss of the assistant tokens over `tasks`, and the attention of the first task."""
    rows = [
        (enc.ids, enc.assistant_mask)
        for enc in (encode_chat(tokenizer, example.demonstration(t), tools=t.tools) for t in tasks)
    ]
    model.eval()
    ids, _ = lm_batch(rows)
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).float(), dim=-1)
    nll = -logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]  # nll[:, i - 1]: loss of token i
    first_ids, first_mask = rows[0]  # every episode has the same layout up to the key and value
    per_token = [
        {"token": tokenizer.decode([first_ids[i]]), "nll": nll[:, i - 1].mean().item()}
        for i in range(1, len(first_ids))
        if first_mask[i]
    ]
    key, value = tasks[0].metadata["key"], tasks[0].answer
    prefix = tokenizer.encode('{"key": "')
    key_at = next(i for i in range(len(first_ids)) if first_ids[i - len(prefix) : i] == prefix)
    value_at = len(first_ids) - len(tokenizer.encode(value)) - 1  # the answer, then <|im_end|>
    probs = attention_probabilities(model, first_ids)
    heads = []
    for target, at in (("key", key_at), ("value", value_at)):
        for layer, p in enumerate(probs):
            for head in range(p.shape[1]):
                top = p[0, head, at - 1].topk(3)  # the position that predicts token `at`
                heads.append(
                    {
                        "predicts": target,
                        "layer": layer,
                        "head": head,
                        "top": [
                            {"position": j, "token": tokenizer.decode([first_ids[j]]), "weight": w}
                            for w, j in zip(top.values.tolist(), top.indices.tolist())
                        ],
                    }
                )
    return {"example": {"key": key, "value": value}, "per_token_loss": per_token, "attention": heads}


def plot(result: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    rows = result["per_token_loss"]
    fig, ax = plt.subplots(figsize=(12, 3.2))
    ax.bar(range(len(rows)), [r["nll"] for r in rows], color="tab:blue")
    ax.axhline(result["chance_nats"], color="tab:red", ls="--", label="chance for one key character")
    ax.set_xticks(range(len(rows)), [r["token"][:6] for r in rows], rotation=90, fontsize=6)
    ax.set_ylabel("loss (nats)")
    ax.set_title(
        f"per-token loss of the assistant turns after {result['steps']} SFT steps, keys from "
        f"{result['alphabet'][:12]!r}",
        fontsize=10,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = harness.parser(NAME, __doc__)
    ap.add_argument("--alphabet", default="ABCDEFGHIJKLMNOPQRSTUVWXYZ", help="characters keys are drawn from")
    ap.add_argument("--key-len", type=int, default=2, help="characters per key")
    ap.add_argument("--steps", type=int, default=300, help="SFT steps")
    ap.add_argument("--demos", type=int, default=4000, help="SFT demonstration episodes")
    ap.add_argument("--lr", type=float, default=0.005, help="SFT learning rate (Muon; AdamW gets a third)")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.demos = 4, 16
    example.ENV_KWARGS.update(alphabet=args.alphabet, key_len=args.key_len)
    try:
        env = make_env(example.ENV, **example.ENV_KWARGS)
    except ValueError as e:
        ap.error(str(e))
    out = harness.setup(args)
    torch.manual_seed(0)
    tokenizer = K2Tokenizer.byte_level()
    model = Transformer(example.model_config())
    curve = example.sft(model, tokenizer, args.demos, args.steps, 16, args.lr, print, curve_tasks=10)
    result = {
        "alphabet": args.alphabet,
        "key_len": args.key_len,
        "steps": args.steps,
        "demos": args.demos,
        "lr": args.lr,
        "chance_nats": math.log(len(args.alphabet)),
        "sft_curve": curve,
        **probe(model, tokenizer, env.sample_tasks(8 if args.quick else 64, seed=0)),
    }
    harness.write_result(out, NAME, result, plot, args)


if __name__ == "__main__":
    main()
