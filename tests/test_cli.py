"""The `openk2` command itself: --version, env, --config FILE, the one error style, chat's context
handling and eval's max_tokens cap. In-process through `openk2.cli.main` where that is enough (the
subprocess matrix is tests/test_cli_errors.py)."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
import torch
from serve_util import LiveServer, tiny_engine, tiny_model

from openk2 import __version__
from openk2.checkpoint import save_model
from openk2.cli import main
from openk2.client import ChatRequest, EndpointBackend, LocalBackend
from openk2.eval.harness import ContextCappedBackend, SampleLog, endpoint_context
from openk2.tokenizer.tokenizer import K2Tokenizer


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out = capsys.readouterr()
    return status, out.out, out.err


def _one_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A `tiny` checkpoint (byte-level tokenizer) with a 160-token context."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_model(tiny_model(max_positions=160), path)
    K2Tokenizer.byte_level().save_pretrained(path)
    return path


def test_version_and_python_dash_m(capsys):
    assert _run(capsys, "--version") == (0, f"openk2 {__version__}\n", "")
    out = subprocess.run([sys.executable, "-m", "openk2", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"openk2 {__version__}"


def test_env_reports_versions_hardware_and_precision(capsys):
    status, out, _ = _run(capsys, "env", "--json")
    report = json.loads(out)
    assert status == 0
    assert report["openk2"] == __version__ and report["torch"] == torch.__version__
    assert report["python"] == ".".join(map(str, sys.version_info[:3]))
    assert "AVX2:" in report["cpu features"] and "AMX:" in report["cpu features"]
    assert report["Newton-Schulz auto on cpu"] in ("bfloat16", "float32")
    assert report["torch threads"] == str(torch.get_num_threads())


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_config_file_supplies_flags_and_the_command_line_wins(tmp_path, capsys, suffix):
    file = tmp_path / f"opts{suffix}"
    if suffix == ".toml":
        file.write_text('preset = "tiny"\ncontext = 128\njson = true\n')
    else:
        file.write_text(json.dumps({"preset": "tiny", "context": 128, "json": True}))
    status, out, _ = _run(capsys, "info", "--config", str(file))
    assert status == 0 and json.loads(out)["flops_per_token"]["context"] == 128
    status, out, _ = _run(capsys, "info", "--config", str(file), "--context", "64")
    assert status == 0 and json.loads(out)["flops_per_token"]["context"] == 64
    # keys may use dashes or underscores; a nested subcommand (tokenizer encode) reads its own flags
    enc = tmp_path / "enc.toml"
    enc.write_text('tokenizer = "bytes"\nallow-special = true\ntext = "<|im_end|>"\n')
    status, out, _ = _run(capsys, "tokenizer", "encode", "--config", str(enc))
    assert status == 0 and json.loads(out) == [K2Tokenizer.byte_level().im_end_id]


@pytest.mark.parametrize(
    "content, needle",
    [
        ('presett = "tiny"', "unknown key 'presett'"),
        ('context = "big"', "key 'context' expects an integer, got 'big'"),
        ("json = 1", "key 'json' expects true or false, got 1"),
        ('preset = "huge"', None),  # a choice-free string: the command itself rejects the preset
        ("context = [1, 2]", "key 'context' expects an integer"),
        ("= broken", "not valid TOML"),
    ],
)
def test_bad_config_file_is_one_line_naming_key_type_and_value(tmp_path, capsys, content, needle):
    file = tmp_path / "bad.toml"
    file.write_text(content + "\n")
    status, _, err = _run(capsys, "info", "--config", str(file))
    line = _one_error(err)
    assert status == 2
    assert (needle or "unknown preset 'huge'") in line
    assert str(file) in line or needle is None


def test_config_file_choices_and_missing_file(tmp_path, capsys):
    file = tmp_path / "c.json"
    file.write_text(json.dumps({"dtype": "float64", "model": "x"}))
    status, _, err = _run(capsys, "serve", "--config", str(file))
    assert status == 2 and "key 'dtype' expects one of float32, bfloat16, float16" in _one_error(err)
    status, _, err = _run(capsys, "info", "--config", str(tmp_path / "none.toml"))
    assert status == 2 and "no such file" in _one_error(err)


def test_info_config_still_takes_a_model_config_or_run_dir(ckpt, capsys):
    status, out, _ = _run(capsys, "info", "--config", str(ckpt / "config.json"), "--json")
    assert status == 0 and json.loads(out)["parameters"]["total"] > 0
    status, out, _ = _run(capsys, "info", "--model", str(ckpt), "--json")
    assert status == 0 and json.loads(out)["parameters"]["total"] > 0


def test_usage_and_runtime_errors(capsys, tmp_path):
    status, _, err = _run(capsys, "info", "--preset", "foo")
    assert status == 2 and "unknown preset 'foo'" in _one_error(err)
    status, _, err = _run(capsys, "sample", str(tmp_path / "missing"))
    assert status == 2 and "neither a checkpoint" in _one_error(err)
    status, _, err = _run(capsys, "sample")
    assert status == 2 and "MODEL or --model" in _one_error(err)
    status, _, err = _run(capsys, "nosuchcommand")
    assert status == 2 and "invalid choice" in _one_error(err)


def test_help_shows_each_default_once(capsys):
    status, out, _ = _run(capsys, "eval", "--help")
    assert status == 0
    assert "(default: its first) (default: None)" not in out and out.count("(default: 512)") == 0
    assert "(default: results)" in out and "(default: 60.0)" in out
    status, out, _ = _run(capsys, "sample", "--help")
    assert status == 0 and "(default: 0.6)" in out and "(default: 100)" in out


def test_chat_drops_oldest_turns_and_marks_cut_replies(ckpt, capsys, monkeypatch):
    """Turns that no longer fit are dropped instead of refusing the conversation; replies cut by
    --max-tokens say so; --max-batch is the engine's slot count."""
    lines = ["first message", "second message", "third message", "fourth", "/exit"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    status, out, err = _run(
        capsys, "chat", str(ckpt), "--max-tokens", "24", "--temperature", "0", "--system", "Be brief.",
        "--max-batch", "2", "--seed", "0",
    )  # fmt: skip
    assert status == 0, err
    replies = [line for line in out.splitlines() if "k2> " in line]
    assert len(replies) == 4, out
    assert "dropped the" in out and "oldest messages" in out  # 160 tokens hold about two turns
    assert "no longer fits" not in out
    # a random tiny model rarely stops by itself within 24 tokens: those replies are marked
    assert sum("[cut: 24 tokens, --max-tokens 24]" in r for r in replies) >= 1


def test_chat_engine_honours_max_batch(ckpt):
    from openk2.serve.cli import load_engine

    assert load_engine(str(ckpt), 3, None, None).stats()["slots"] == 3


@pytest.fixture(scope="module")
def run_dir(ckpt, tmp_path_factory):
    """A training run directory whose latest checkpoint is `ckpt`'s model."""
    from openk2.checkpoint import load
    from openk2.checkpoint.store import save_checkpoint

    path = tmp_path_factory.mktemp("run") / "run"
    model, tok = load(ckpt)
    save_checkpoint(path, 3, model, tok, {"step": 3})
    return path


def test_run_dir_is_accepted_by_info_tokenizer_and_eval(run_dir, tmp_path, capsys):
    status, out, _ = _run(capsys, "info", "--config", str(run_dir), "--json")
    assert status == 0 and json.loads(out)["parameters"]["total"] > 0
    status, out, _ = _run(capsys, "tokenizer", "info", "--tokenizer", str(run_dir))
    assert status == 0 and json.loads(out)["vocab_size"] == K2Tokenizer.byte_level().vocab_size
    argv = ["eval", "gym", "--model", str(run_dir), "--envs", "arithmetic", "--n-tasks", "2", "--max-tokens"]
    argv += ["8", "--out", str(tmp_path), "--no-progress", "--log-samples"]
    status, out, err = _run(capsys, *argv)
    assert status == 0, err
    (result,) = tmp_path.glob("gym-run-step-0000003-*.json")  # the run's checkpoint, labelled with a hash
    assert json.loads(result.read_text())["n_items"] == 2
    samples = [json.loads(line) for line in result.with_suffix(".samples.jsonl").read_text().splitlines()]
    assert len(samples) >= 2 and all("content" in s["response"] for s in samples)
    assert f"samples: {result.with_suffix('.samples.jsonl')}" in err  # the command says where they are


def test_sample_streams_and_accepts_a_run_dir(ckpt, run_dir, capsys):
    from openk2.train.sample import generate_text

    pieces: list[str] = []
    text = generate_text(str(ckpt), "Hi", max_new_tokens=30, temperature=0, on_text=pieces.append)
    assert len(pieces) > 1 and "Hi" + "".join(pieces) == text  # handed out piece by piece, nothing lost
    argv = ["sample", str(run_dir), "--prompt", "Hi", "--max-new-tokens", "30", "--temperature", "0"]
    status, out, err = _run(capsys, *argv)
    assert status == 0, err
    assert out == text + "\n"  # the run directory's latest checkpoint, greedy: the same text


def _long_request(max_tokens: int) -> ChatRequest:
    return ChatRequest([{"role": "user", "content": "x" * 40}], max_tokens=max_tokens, temperature=0.0)


def test_eval_caps_max_tokens_at_the_endpoint_context(tmp_path):
    """A ~120-token prompt with max_tokens 100 overflows a 160-token server (HTTP 400); the capped
    backend reads the context from /v1/models and asks for what is left."""
    with LiveServer(tiny_engine(max_batch=2, max_seq_len=160)) as srv:
        assert endpoint_context(srv.url + "/v1") == 160
        plain = EndpointBackend(srv.url + "/v1", timeout=30, max_retries=0)
        (refused,) = plain.chat_many([_long_request(100)])
        assert refused.error and refused.error.startswith("http_400") and "context" in refused.error
        capped = ContextCappedBackend(plain, endpoint_context(srv.url + "/v1"))
        logged = SampleLog(capped, tmp_path / "samples.jsonl")
        (ok,) = logged.chat_many([_long_request(100)])
        plain.close()
    assert ok.error is None and ok.finish_reason in ("length", "stop") and capped.capped >= 1
    record = json.loads((tmp_path / "samples.jsonl").read_text().splitlines()[0])
    assert record["request"]["messages"][0]["content"] == "x" * 40
    assert record["response"]["content"] == ok.content and record["response"]["error"] is None


def test_eval_caps_max_tokens_in_process(ckpt):
    from openk2.tokenizer.chat import encode_chat

    local = LocalBackend(ckpt, max_batch=2)
    tok = local.tokenizer
    count = lambda r: len(encode_chat(tok, r.messages, r.tools, add_generation_prompt=True).ids)  # noqa: E731
    (refused,) = local.chat_many([_long_request(100)])
    assert refused.error and "context" in refused.error
    capped = ContextCappedBackend(local, local.engine.max_seq_len, count)
    (ok,) = capped.chat_many([_long_request(100)])
    local.close()
    assert ok.error is None and capped.capped == 1


def test_eval_cap_fills_in_max_tokens_none(ckpt):
    """max_tokens None asks for as many tokens as fit: the capped backend sets the room left."""
    from openk2.tokenizer.chat import encode_chat

    local = LocalBackend(ckpt, max_batch=2)
    count = lambda r: len(encode_chat(local.tokenizer, r.messages, r.tools, add_generation_prompt=True).ids)  # noqa: E731
    seen = []
    capped = ContextCappedBackend(local, local.engine.max_seq_len, count)
    spy = {"chat_many": lambda _, reqs: seen.extend(reqs) or local.chat_many(reqs)}
    capped.backend = type("Spy", (), spy)()
    (ok,) = capped.chat_many([_long_request(None)])
    local.close()
    room = local.engine.max_seq_len - count(_long_request(None)) + 1
    assert ok.error is None and seen[0].max_tokens == room and capped.capped == 1


def test_serve_start_up_summary_is_plain_text(ckpt):
    from openk2.serve.cli import load_engine, summary

    engine = load_engine(str(ckpt), 2, None, None)
    text = summary(engine, "tiny", ckpt, "http://127.0.0.1:8000/v1", api_key=False, constrained=True)
    assert text.startswith("openk2 serve: tiny\n") and "{" not in text
    assert "2 slots x 160 tokens" in text and "http://127.0.0.1:8000/v1" in text
    assert "M parameters, float32 on cpu" in text


def test_eval_default_labels_are_unique_per_model_and_config_but_stable():
    from openk2.eval.harness import default_label

    a = default_label("small", {"model": "/r/a"}, {"n_tasks": 20})
    assert a == default_label("small", {"model": "/r/a"}, {"n_tasks": 20})  # same command: resumes
    assert a != default_label("small", {"model": "/r/b"}, {"n_tasks": 20})  # another checkpoint
    assert a != default_label("small", {"model": "/r/a"}, {"n_tasks": 50})  # another config
    assert a.startswith("small-")


def test_synth_scripted_ends_with_a_plain_summary(tmp_path, capfd):
    # capfd: the MCP client hands the real stderr file descriptor to the tool server
    tools = tmp_path / "tools.jsonl"
    status, _, err = _run(capfd, "synth", "tools", "--out", str(tools), "--no-synthetic")
    assert status == 0, err
    out_file = tmp_path / "traj.jsonl"
    argv = ["synth", "trajectories", "--tools", str(tools), "--scripted", "--out", str(out_file)]
    status, out, _ = _run(capfd, *argv, "--agents", "1", "--tasks-per-agent", "2")
    assert status == 0
    last = out.strip().splitlines()[-1]
    assert last == f"trajectories: 2 items: 2 accepted, 0 rejected, 0 failed; written to {out_file}"
    assert "RunSummary(" not in out and "prompt tokens" not in out  # no all-zero request table


def test_debug_shows_the_traceback(capsys):
    with pytest.raises(ValueError, match="unknown preset 'foo'"):
        main(["--debug", "info", "--preset", "foo"])
    with pytest.raises(ValueError, match="unknown preset 'foo'"):
        main(["info", "--preset", "foo", "--debug"])  # after the subcommand too
