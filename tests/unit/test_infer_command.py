"""``din infer``: its arguments through the real parser, and its output formatting, without a network."""

from __future__ import annotations

import asyncio
import io
import json

import pytest

from din.cli import build_parser
from din.client import DinRequestError, NoAnswerError
from din.commands.infer import (
    answer_json,
    cmd_infer,
    error_json,
    pick_model,
    report_failure,
    request_options,
    stream_summary,
    stream_text,
)
from din.shared.contracts.inference import InferResponseV1, ServedByV1, StreamChunkV1
from din.shared.errors import DinError, ErrorCode


def parse(*argv: str):
    return build_parser().parse_args(["infer", *argv])


def served_by(**extra) -> ServedByV1:
    return ServedByV1(site="factory", executor="ex-1", model="charlm", model_version="1", degraded=False,
                      batch_size=1, **extra)


def chunk(seq: int, text: str, **extra) -> StreamChunkV1:
    return StreamChunkV1(id="r1", seq=seq, text=text, **extra)


def bad_request(message: str = "cascade, max_tokens and split cannot be combined") -> DinRequestError:
    return DinRequestError(DinError(ErrorCode.BAD_REQUEST, message).to_model("r1"))


async def chunks_then(items, failure: BaseException | None = None):
    for item in items:
        yield item
    if failure is not None:
        raise failure


def test_prompt_arguments_parse_and_default_to_the_text_model():
    args = parse("--tenant", "acme", "--prompt", "def ", "--max-tokens", "5")
    assert (args.tenant, args.prompt, args.max_tokens, args.model) == ("acme", "def ", 5, None)
    assert args.handler is cmd_infer
    assert pick_model(args) == "charlm"


def test_without_prompt_the_digits_model_is_the_default_and_max_tokens_is_32():
    args = parse("--tenant", "acme")
    assert args.prompt is None and args.max_tokens == 32
    assert pick_model(args) == "digits-small"


@pytest.mark.parametrize("extra", [[], ["--prompt", "def "]])
def test_an_explicit_model_wins(extra):
    assert pick_model(parse("--tenant", "acme", "--model", "digits-large", *extra)) == "digits-large"


def test_split_options_pass_through_to_the_client():
    args = parse("--tenant", "acme", "--model", "digits-large", "--labels", "pii,,secret", "--split", "hidden_2",
                 "--split-protection", "quantize:4", "--sla", "realtime", "--timeout-ms", "800")
    assert request_options(args) == {
        "sla": "realtime", "timeout_ms": 800, "labels": ["pii", "secret"], "allow_degrade": False,
        "min_accuracy": None, "version": None, "binary": False, "cascade": None, "cascade_rate": None,
        "split": "hidden_2", "split_protection": "quantize:4",
    }


def test_options_without_split_leave_it_unset():
    options = request_options(parse("--tenant", "acme", "--prompt", "x", "--allow-degrade", "--version", "2"))
    assert options["split"] is None and options["split_protection"] is None
    assert options["allow_degrade"] is True and options["version"] == "2" and options["labels"] == []


def test_prompt_and_split_are_rejected_together(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse("--tenant", "acme", "--prompt", "def ", "--split", "auto")
    assert exit_.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_max_tokens_must_be_a_number(capsys):
    with pytest.raises(SystemExit):
        parse("--tenant", "acme", "--prompt", "def ", "--max-tokens", "many")
    assert "--max-tokens" in capsys.readouterr().err


def test_stream_summary_is_one_json_line_of_where_when_and_why():
    last = chunk(5, "", done=True, finish_reason="length", token=None,
                 served_by=served_by(stages=["prefill:charlm-prefill@cloud/ex-0", "decode:charlm@factory/ex-1"]),
                 timings_ms={"ttft": 12.5, "tpot": 3.0})
    line = stream_summary(last)
    assert "\n" not in line
    summary = json.loads(line)
    assert set(summary) == {"served_by", "timings_ms", "finish_reason"}
    assert summary["finish_reason"] == "length"
    assert summary["timings_ms"] == {"ttft": 12.5, "tpot": 3.0}
    assert summary["served_by"]["stages"] == ["prefill:charlm-prefill@cloud/ex-0", "decode:charlm@factory/ex-1"]


def test_stream_text_writes_chunks_as_they_come_then_ends_the_line():
    out = io.StringIO()
    last = asyncio.run(stream_text(chunks_then([chunk(0, "ret"), chunk(1, "urn"), chunk(2, "", done=True)]), out))
    assert out.getvalue() == "return\n"
    assert last.done and last.seq == 2


def test_a_mid_stream_error_ends_the_line_and_propagates():
    out = io.StringIO()
    with pytest.raises(DinRequestError):
        asyncio.run(stream_text(chunks_then([chunk(0, "ret")], bad_request()), out))
    assert out.getvalue() == "ret\n"


def test_an_error_before_any_text_writes_nothing():
    out = io.StringIO()
    with pytest.raises(NoAnswerError):
        asyncio.run(stream_text(chunks_then([], NoAnswerError("no answer within 1.0s")), out))
    assert out.getvalue() == ""


def test_a_din_error_prints_its_json_and_fails(capsys):
    assert report_failure(bad_request("split must be 'auto'")) == 1
    printed = json.loads(capsys.readouterr().out)
    assert printed["error"]["code"] == "bad_request"
    assert printed["error"]["message"] == "split must be 'auto'"
    assert "retry_after_ms" not in printed["error"]
    assert error_json(bad_request("split must be 'auto'")) == json.dumps(printed, indent=2)


def test_no_answer_prints_one_line_and_fails(capsys):
    assert report_failure(NoAnswerError("no admission service is listening: is the DIN stack running?")) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "din: error: no admission service is listening: is the DIN stack running?\n"


def test_a_digit_answer_drops_raw_outputs_and_adds_labels():
    response = InferResponseV1(
        model_name="digits-large", model_version="1", id="r1", outputs=[],
        served_by=served_by(split_point="hidden_2"), timings_ms={"total": 4.0},
    )
    answer = json.loads(answer_json(response, label=7, truth=3))
    assert "outputs" not in answer
    assert (answer["label"], answer["true_label"]) == (7, 3)
    assert answer["served_by"]["split_point"] == "hidden_2"


class FakeClient:
    """Stands in for ``DinClient``: records the call and streams the given chunks (then maybe fails)."""

    def __init__(self, chunks, failure=None):
        self.chunks, self.failure, self.calls = chunks, failure, []

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return None

    def generate(self, model, prompt, max_tokens, *, timeout_ms=None, **options):
        self.calls.append((model, prompt, max_tokens, timeout_ms, options))
        return chunks_then(self.chunks, self.failure)


def run_generation(monkeypatch, client: FakeClient, *argv: str) -> int:
    async def connect(url, tenant, token, keys, options=None, site=None):
        return client

    monkeypatch.setattr("din.commands.infer.running_tenant",
                        lambda din_dir, tenant, site=None: ("nats://x", "tok", None, {}))
    monkeypatch.setattr("din.commands.infer.DinClient.connect", connect)
    return cmd_infer(parse("--tenant", "acme", *argv))


def test_generation_streams_then_prints_the_summary(monkeypatch, capsys):
    last = chunk(2, "", done=True, finish_reason="length", served_by=served_by(), timings_ms={"ttft": 1.0})
    client = FakeClient([chunk(0, "ret"), chunk(1, "urn"), last])
    assert run_generation(monkeypatch, client, "--prompt", "def ", "--max-tokens", "2", "--timeout-ms", "900") == 0
    text, summary, end = capsys.readouterr().out.split("\n")
    assert (text, end) == ("return", "")
    assert json.loads(summary) == json.loads(stream_summary(last))
    model, prompt, max_tokens, timeout_ms, options = client.calls[0]
    assert (model, prompt, max_tokens, timeout_ms) == ("charlm", "def ", 2, 900)
    assert options["sla"] == "interactive" and options["split"] is None


def test_generation_failing_mid_stream_prints_the_error_and_fails(monkeypatch, capsys):
    client = FakeClient([chunk(0, "ret")], bad_request("executor lost"))
    assert run_generation(monkeypatch, client, "--prompt", "def ") == 1
    out = capsys.readouterr().out
    text, error = out.split("\n", 1)
    assert text == "ret"
    assert json.loads(error)["error"]["message"] == "executor lost"
