"""SFT: assistant-only loss mask, packing without cross-conversation attention, and a real run."""

import json

import pytest
import torch

from openk2.checkpoint import load_model, save_model
from openk2.config import ModelConfig
from openk2.model.transformer import Transformer
from openk2.tokenizer.chat import encode_chat
from openk2.tokenizer.tokenizer import K2Tokenizer
from openk2.train.sft import SFTConfig, SFTLoader, encode_conversation, load_conversations, pack, sft

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]


def conversation(city: str) -> dict:
    return {
        "tools": TOOLS,
        "messages": [
            {"role": "user", "content": f"Weather in {city}?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "id": "functions.get_weather:0",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": json.dumps({"city": city})},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": '{"temp": 21}'},
            {"role": "assistant", "content": f"It is 21 degrees in {city}."},
        ],
    }


@pytest.fixture(scope="module")
def tok():
    return K2Tokenizer.byte_level()


def test_mask_covers_exactly_the_assistant_tokens(tok):
    conv = conversation("Oslo")
    x, y, m = encode_conversation(tok, conv)
    assert len(x) == len(y) == len(m)
    enc = encode_chat(tok, conv["messages"], conv["tools"])
    assert y == enc.ids[1:] and x == enc.ids[:-1]
    trained = tok.decode([t for t, keep in zip(y, m) if keep])
    # The tool call (markers, id, JSON arguments) and the final answer are trained on ...
    assert '{"city": "Oslo"}' in trained and "functions.get_weather:0" in trained
    assert "It is 21 degrees in Oslo." in trained
    assert trained.count("<|im_end|>") == 2  # the two assistant turns' closing markers
    # ... user text, the tool declaration and the tool result are not.
    assert (
        "Weather in Oslo?" not in trained and '{"temp": 21}' not in trained and 'get_weather"' not in trained
    )


def test_pack_keeps_conversations_apart(tok):
    examples = [
        encode_conversation(tok, conversation(c)) for c in ["Oslo", "Lima", "Pune", "Seoul", "Austin"]
    ]
    longest = max(len(e[0]) for e in examples)
    p = pack(examples, seq_len=2 * longest + 5)
    assert p.conversations == 5 and p.dropped == 0
    assert len(p.input_ids) == 3  # two per row, first-fit-decreasing
    assert p.assistant_tokens == sum(sum(e[2]) for e in examples)
    for r in range(len(p.input_ids)):
        seg = p.segment_ids[r]
        pad_seg = seg.max()
        assert not p.loss_mask[r][seg == pad_seg].any()  # padding never counts
    # Every conversation appears intact as one segment.
    seen = []
    for r in range(len(p.input_ids)):
        for s in p.segment_ids[r].unique().tolist()[:-1]:
            seen.append(p.input_ids[r][p.segment_ids[r] == s].tolist())
    assert sorted(seen) == sorted(e[0] for e in examples)
    # Too long: dropped and counted, never truncated.
    assert pack(examples, seq_len=longest - 1).dropped >= 1


def test_packed_rows_give_the_same_logits_as_separate_conversations(tok):
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny")).eval()
    examples = [encode_conversation(tok, conversation(c)) for c in ["Oslo", "Lima"]]
    p = pack(examples, seq_len=sum(len(e[0]) for e in examples) + 3)
    assert len(p.input_ids) == 1
    with torch.no_grad():
        packed = model(p.input_ids, segment_ids=p.segment_ids)[0]
        for s, (x, _, _) in enumerate(sorted(examples, key=lambda e: -len(e[0]))):
            alone = model(torch.tensor([x]))[0]
            torch.testing.assert_close(packed[p.segment_ids[0] == s], alone, atol=2e-4, rtol=1e-4)


def test_loader_resumes_mid_epoch(tok):
    examples = [encode_conversation(tok, conversation(c)) for c in ["A", "B", "C", "D", "E", "F"]]
    p = pack(examples, seq_len=max(len(e[0]) for e in examples))
    a = SFTLoader(p, batch_size=2, seed=3)
    a.batches(4)
    b = SFTLoader(p, batch_size=2, seed=3)
    b.load_state_dict(a.state_dict())
    for x, y in zip(a.batches(3), b.batches(3)):
        assert torch.equal(x.input_ids, y.input_ids)


def test_bad_data_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(ValueError, match="no assistant message"):
        load_conversations(bad)
    with pytest.raises(FileNotFoundError):
        load_conversations(tmp_path / "missing.jsonl")


def test_sft_run_lowers_assistant_loss_and_resumes(tmp_path, tok):
    torch.manual_seed(0)
    init = tmp_path / "init"
    save_model(Transformer(ModelConfig.from_preset("tiny")), init)
    tok.save_pretrained(init)
    data = tmp_path / "chat.jsonl"
    cities = ["Oslo", "Lima", "Pune", "Seoul", "Austin", "Paris", "Tokyo", "Lagos"] * 4
    # The tiny preset holds 256 positions of bytes: a short system prompt and no tool declaration.
    short = [dict(conversation(c), tools=None) for c in cities]
    for conv in short:
        conv["messages"].insert(0, {"role": "system", "content": "Be brief."})
    data.write_text("".join(json.dumps(c) + "\n" for c in short))
    cfg = SFTConfig(
        data=str(data), init=str(init), out_dir=str(tmp_path / "run"), steps=30, batch_size=4, seq_len=256,
        lr=1e-2, val_fraction=0.125, eval_every=30, save_every=15, progress=False, tensorboard=False,
        device="cpu",
    )  # fmt: skip
    out = sft(cfg)
    assert out["steps"] == 30 and out["dropped_too_long"] == 0
    assert out["eval_loss_after"] < 0.7 * out["eval_loss_before"]
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(m.get("kind") == "train" and "heads_clipped" in m for m in metrics)  # MuonClip's step
    # Resume: a longer run continues from step 30 instead of starting over.
    cfg.steps = 33
    again = sft(cfg)
    assert again["steps"] == 33
    reloaded = load_model(again["checkpoint"])
    assert reloaded.config.vocab_size == 512


def test_sft_command_warns_up_front_and_draws_curves(tmp_path, tok, capsys):
    """Conversations that do not fit are announced before training; the run ends with a readable
    summary and curves.png; a bad --init is one line."""
    import argparse

    from openk2.train import sft as sft_cli

    torch.manual_seed(0)
    init = tmp_path / "init"
    save_model(Transformer(ModelConfig.from_preset("tiny")), init)
    tok.save_pretrained(init)
    data = tmp_path / "chat.jsonl"
    convs = [dict(conversation(c), tools=None) for c in ["Oslo", "Lima", "Pune", "Seoul"]]
    convs.append(
        {"messages": [{"role": "user", "content": "x" * 400}, {"role": "assistant", "content": "y"}]}
    )
    data.write_text("".join(json.dumps(c) + "\n" for c in convs))

    def run(*argv: str) -> tuple[int, str, str]:
        parser = argparse.ArgumentParser()
        sft_cli.add_arguments(parser)
        capsys.readouterr()
        code = sft_cli.run(parser.parse_args([str(data), *argv]))
        out, err = capsys.readouterr()
        return code, out, err

    out_dir = str(tmp_path / "run")
    common = ["--out-dir", out_dir, "--steps", "2", "--batch-size", "2", "--seq-len", "256",
              "--device", "cpu", "--val-fraction", "0", "--no-progress"]  # fmt: skip
    code, out, err = run("--init", str(init), *common)
    assert code == 0, err
    assert "warning: 1 of 5 conversations are longer than --seq-len 256" in err
    assert out.splitlines()[-3].startswith("fine-tuned 2 steps") and "1 left out as too long" in out
    assert (tmp_path / "run" / "curves.png").stat().st_size > 1000
    code, out, err = run("--init", str(tmp_path / "nowhere"), *common)
    assert code == 2 and err.count("\n") == 1 and "neither a checkpoint" in err
