"""The serving load generator (magicpig/bench/serve.py): metrics on hand-timed records, arrival
processes, workloads, trace files, stream parsing and the command's argument checks. No model:
the client runs once against a stdlib HTTP server streaming canned chunks, and once against a
closed port."""

import asyncio
import json
import math
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from magicpig.bench import serve as bench
from magicpig.bench.serve import (RequestRecord, compute_metrics, format_summary, parse_error_body, parse_goodput,
                                  parse_sse_lines, record_from_stream)
from magicpig.perf.workloads import WorkItem, arrival_times, choose_arrivals, random_workload
from magicpig.perf.workloads import load_work as load_trace


def rec(start, chunks, end, out, prompt=10, success=True, usage=True, error=""):
    return RequestRecord(success=success, start_s=start, end_s=end, first_chunk_s=chunks[0] if chunks else None,
                         token_times_s=list(chunks), output_tokens=out, prompt_tokens=prompt, usage_seen=usage,
                         saw_done=success, status=200 if success else 500, error=error)


# ----------------------------------------------------------------------------- metrics


def three_requests():
    # A: start 0, chunks at 0.1, 0.3, 0.6, end 0.7, 3 tokens -> TTFT 100, E2E 700, TPOT 300, ITL 200, 300
    # B: start 1.0, chunks at 1.2, 1.25, end 1.5, 5 tokens  -> TTFT 200, E2E 500, TPOT 75,  ITL 50
    # C: start 2.0, one chunk at 2.4, end 2.5, 1 token      -> TTFT 400, E2E 500, no TPOT, no ITL
    return [rec(0.0, [0.1, 0.3, 0.6], 0.7, 3, prompt=10),
            rec(1.0, [1.2, 1.25], 1.5, 5, prompt=20),
            rec(2.0, [2.4], 2.5, 1, prompt=30)]


def test_metrics_match_hand_computed_values():
    m = compute_metrics(three_requests(), duration_s=4.0)
    assert (m["completed"], m["failed"]) == (3, 0)
    assert (m["total_input_tokens"], m["total_output_tokens"]) == (60, 9)
    assert m["duration_s"] == 4.0
    assert m["request_throughput"] == pytest.approx(0.75)
    assert m["output_throughput"] == pytest.approx(9 / 4)
    assert m["total_token_throughput"] == pytest.approx(69 / 4)
    # TTFT samples 100, 200, 400 ms: p99 (linear) = 200 + 0.98 * 200
    assert m["mean_ttft_ms"] == pytest.approx(700 / 3)
    assert m["median_ttft_ms"] == pytest.approx(200)
    assert m["p99_ttft_ms"] == pytest.approx(396)
    assert m["std_ttft_ms"] == pytest.approx(np.std([100, 200, 400]))
    # TPOT: the one-token request C has none; A (0.7-0.1)/2 = 300 ms, B (0.5-0.2)/4 = 75 ms
    assert m["mean_tpot_ms"] == pytest.approx(187.5)
    assert m["median_tpot_ms"] == pytest.approx(187.5)
    assert m["p99_tpot_ms"] == pytest.approx(75 + 0.99 * 225)
    # ITL pooled over requests: 200, 300, 50 ms
    assert m["mean_itl_ms"] == pytest.approx(550 / 3)
    assert m["median_itl_ms"] == pytest.approx(200)
    assert m["p99_itl_ms"] == pytest.approx(200 + 0.98 * 100)
    # E2E: 700, 500, 500 ms
    assert m["mean_e2el_ms"] == pytest.approx(1700 / 3)
    assert m["median_e2el_ms"] == pytest.approx(500)
    assert m["p99_e2el_ms"] == pytest.approx(500 + 0.98 * 200)
    assert m["request_goodput"] is None and m["errors"] == []


def test_only_single_token_requests_have_no_tpot_and_failures_are_excluded():
    records = [rec(0.0, [0.05], 0.1, 1),
               rec(0.0, [0.5, 0.9], 5.0, 7, prompt=999, success=False, error="HTTP 500: boom"),
               rec(0.0, [], 0.01, 0, success=False, error="ConnectError: refused")]
    m = compute_metrics(records, duration_s=2.0)
    assert (m["completed"], m["failed"]) == (1, 2)
    # The failed request's tokens, prompt and latencies are nowhere in the results.
    assert (m["total_input_tokens"], m["total_output_tokens"]) == (10, 1)
    assert m["mean_tpot_ms"] is None and m["p99_itl_ms"] is None
    assert m["mean_ttft_ms"] == pytest.approx(50) and m["p99_e2el_ms"] == pytest.approx(100)
    assert m["errors"] == ["HTTP 500: boom", "ConnectError: refused"]


def test_errors_are_distinct_and_at_most_five():
    records = [rec(0, [], 1, 0, success=False, error=f"e{i % 7}") for i in range(30)]
    m = compute_metrics(records, 1.0)
    assert m["errors"] == ["e0", "e1", "e2", "e3", "e4"]
    assert m["completed"] == 0 and m["mean_ttft_ms"] is None and m["request_throughput"] == 0


def test_goodput_counts_requests_meeting_every_limit():
    records = three_requests() + [rec(3.0, [3.1], 3.2, 5, success=False, error="x")]
    # TTFT 100/200/400, TPOT 300/75/(one token: 0), E2E 700/500/500; the failed one never counts.
    cases = {(("ttft", 250.0),): 2, (("ttft", 200.0),): 2, (("ttft", 199.0),): 1,
             (("tpot", 100.0),): 2, (("e2el", 500.0),): 2, (("e2el", 499.0),): 0,
             (("ttft", 500.0), ("tpot", 100.0)): 2, (("ttft", 150.0), ("tpot", 100.0)): 0,
             (("ttft", 1000.0), ("tpot", 1000.0), ("e2el", 1000.0)): 3}
    for slos, good in cases.items():
        m = compute_metrics(records, 2.0, dict(slos))
        assert m["good_requests"] == good, slos
        assert m["request_goodput"] == pytest.approx(good / 2.0)


def test_goodput_specs():
    assert parse_goodput(["ttft:500", "e2el:3000.5"]) == {"ttft": 500.0, "e2el": 3000.5}
    for bad in ["ttft", "itl:5", "ttft:abc", "ttft:-1", "ttft:inf", "tpot=5"]:
        with pytest.raises(ValueError, match="--goodput") as err:
            parse_goodput([bad])
        assert repr(bad) in str(err.value)
    with pytest.raises(ValueError, match="twice"):
        parse_goodput(["ttft:1", "ttft:2"])
    with pytest.raises(ValueError, match="goodput_slos"):
        compute_metrics(three_requests(), 1.0, {"itl": 5.0})
    with pytest.raises(ValueError, match="duration_s"):
        compute_metrics(three_requests(), 0.0)


def test_summary_table_shows_the_metrics():
    m = compute_metrics(three_requests(), 4.0, {"ttft": 250.0})
    text = format_summary(m)
    assert "============ Serving Benchmark Result ============" in text
    assert "Successful requests:                     3" in text
    assert "Request goodput (req/s):                 0.50" in text
    assert "Mean TTFT (ms):                          233.33" in text
    assert "P99 ITL (ms):                            298.00" in text
    empty = format_summary(compute_metrics([rec(0, [], 1, 0, success=False, error="boom")], 1.0))
    assert "Mean TPOT (ms):                          n/a" in empty and "error: boom" in empty


# ----------------------------------------------------------------------------- arrivals


def test_infinite_rate_sends_everything_at_once():
    assert arrival_times(5, math.inf, 1.0, 0) == [0.0] * 5
    assert arrival_times(0, 3.0, 1.0, 0) == [] and arrival_times(1, 3.0, 1.0, 0) == [0.0]


@pytest.mark.parametrize("burstiness", [1.0, 4.0])
def test_gamma_gaps_have_the_asked_mean_and_variation(burstiness):
    n, rate = 20000, 8.0
    times = np.asarray(arrival_times(n + 1, rate, burstiness, seed=3))
    assert times[0] == 0.0 and np.all(np.diff(times) >= 0)
    gaps = np.diff(times)
    mean, sd = 1 / rate, 1 / (rate * math.sqrt(burstiness))  # gamma(k, 1/(rate*k)): mean 1/rate, CV 1/sqrt(k)
    assert abs(gaps.mean() - mean) < 5 * sd / math.sqrt(n)
    # Relative standard error of the sample CV: sample sd ~ sqrt((kurtosis - 1) / 4n) with
    # kurtosis 3 + 6/k for a gamma, plus the mean's 1/sqrt(k n); 5 of them as tolerance.
    rel_se = math.sqrt((2 + 6 / burstiness) / (4 * n) + 1 / (burstiness * n))
    cv = gaps.std(ddof=1) / gaps.mean()
    assert abs(cv - 1 / math.sqrt(burstiness)) < 5 * rel_se / math.sqrt(burstiness)


def test_arrivals_are_deterministic_per_seed():
    assert arrival_times(50, 2.0, 0.5, 7) == arrival_times(50, 2.0, 0.5, 7)
    assert arrival_times(50, 2.0, 0.5, 7) != arrival_times(50, 2.0, 0.5, 8)


@pytest.mark.parametrize("rate, burst, name", [(0.0, 1.0, "request_rate"), (-2.0, 1.0, "request_rate"),
                                               (math.nan, 1.0, "request_rate"), (-math.inf, 1.0, "request_rate"),
                                               (1.0, 0.0, "burstiness"), (1.0, -1.0, "burstiness"),
                                               (1.0, math.inf, "burstiness"), (1.0, math.nan, "burstiness")])
def test_bad_rate_or_burstiness_is_named(rate, burst, name):
    with pytest.raises(ValueError, match=name):
        arrival_times(3, rate, burst, 0)


def test_trace_arrivals_win_only_when_every_item_has_one():
    timed = [WorkItem("a", 1, 0.0), WorkItem("b", 1, 2.5)]
    assert choose_arrivals(timed, 1.0, 1.0, 0)[0] == [0.0, 2.5]
    assert choose_arrivals(timed, math.inf, 1.0, 0, ignore_trace_arrivals=True)[0] == [0.0, 0.0]
    partial = [WorkItem("a", 1, 1.0), WorkItem("b", 1)]
    arrivals, source = choose_arrivals(partial, math.inf, 1.0, 0)
    assert arrivals == [0.0, 0.0] and "lack arrival_s" in source


# ----------------------------------------------------------------------------- workloads


def test_random_workload_lengths_ids_and_seed():
    items = random_workload(200, 100, 20, 0.1, seed=1, vocab_low=50, vocab_high=60)
    in_lens = [len(item.prompt) for item in items]
    out_lens = [item.max_tokens for item in items]
    assert min(in_lens) >= 90 and max(in_lens) <= 110 and min(out_lens) >= 18 and max(out_lens) <= 22
    assert len(set(in_lens)) > 10  # the lengths do vary (and reach both ends with 200 draws)
    assert min(in_lens) == 90 and max(in_lens) == 110
    ids = np.concatenate([item.prompt for item in items])
    assert ids.min() >= 50 and ids.max() < 60 and all(type(t) is int for t in items[0].prompt)
    assert [i.prompt for i in items] == [i.prompt for i in random_workload(200, 100, 20, 0.1, 1, 50, 60)]
    assert items[0].prompt != random_workload(1, 100, 20, 0.1, 2, 50, 60)[0].prompt
    fixed = random_workload(5, 7, 3, 0.0, seed=0)
    assert [len(i.prompt) for i in fixed] == [7] * 5 and [i.max_tokens for i in fixed] == [3] * 5
    assert all(len(i.prompt) >= 1 for i in random_workload(50, 1, 1, 0.9, seed=0))
    with pytest.raises(ValueError, match="range_ratio"):
        random_workload(1, 10, 10, 1.0, 0)


# ----------------------------------------------------------------------------- traces


def test_trace_is_parsed(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"prompt": "hello", "max_tokens": 4, "arrival_s": 0.5, "note": "x"}\n\n'
                    '   \n{"prompt": [1, 2, 3], "max_tokens": 1}\n')
    assert load_trace(path) == [WorkItem("hello", 4, 0.5), WorkItem([1, 2, 3], 1, None)]


@pytest.mark.parametrize("line, field", [
    ('{"prompt": "x"}', "max_tokens"),
    ('{"prompt": "x", "max_tokens": 0}', "max_tokens"),
    ('{"prompt": "x", "max_tokens": 2.5}', "max_tokens"),
    ('{"prompt": "x", "max_tokens": true}', "max_tokens"),
    ('{"prompt": {"text": "x"}, "max_tokens": 3}', "prompt"),
    ('{"prompt": [1, "a"], "max_tokens": 3}', "prompt"),
    ('{"prompt": "", "max_tokens": 3}', "prompt"),
    ('{"max_tokens": 3}', "prompt"),
    ('{"prompt": "x", "max_tokens": 3, "arrival_s": -1}', "arrival_s"),
    ('{"prompt": "x", "max_tokens": 3, "arrival_s": "soon"}', "arrival_s"),
    ('{"prompt": "x", "max_tokens": 3', "not valid JSON"),
    ('[1, 2]', "JSON object"),
])
def test_bad_trace_line_names_file_line_and_field(tmp_path, line, field):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok", "max_tokens": 1}\n\n' + line + "\n")
    with pytest.raises(ValueError) as err:
        load_trace(path)
    message = str(err.value)
    assert str(path) in message and "line 3" in message and field in message


def test_missing_or_empty_trace(tmp_path):
    with pytest.raises(ValueError, match="cannot read"):
        load_trace(tmp_path / "absent.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="no requests"):
        load_trace(tmp_path / "empty.jsonl")


# ----------------------------------------------------------------------------- streams

STREAM = """\
data: {"id":"cmpl-1","object":"text_completion","choices":[{"index":0,"text":"Hello","finish_reason":null}]}

: keep-alive comment
data: {"id":"cmpl-1","object":"text_completion","choices":[{"index":0,"text":"","finish_reason":null}]}

data: {"id":"cmpl-1","object":"text_completion","choices":[{"index":0,"text":" big","finish_reason":null}]}

data: {"id":"cmpl-1","object":"text_completion","choices":[{"index":0,"text":" world","finish_reason":"length"}],"usage":null}

data: {"id":"cmpl-1","object":"text_completion","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":4,"total_tokens":9}}

data: [DONE]

"""


def test_sse_lines_parse_into_events():
    events = parse_sse_lines(STREAM.splitlines())
    assert [e.text for e in events] == ["Hello", "", " big", " world", None, None]
    assert events[3].finish_reason == "length" and events[0].finish_reason is None
    assert events[4].usage == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}
    assert [e.done for e in events] == [False] * 5 + [True]
    assert parse_sse_lines(["event: message", "id: 3", "data:[DONE]"])[0].done  # no space after the colon
    with pytest.raises(ValueError, match="not JSON"):
        parse_sse_lines(["data: {oops"])


def test_stream_record_times_non_empty_chunks_and_takes_usage():
    lines = STREAM.splitlines()
    timed = [(10.0 + 0.1 * i, line) for i, line in enumerate(lines)]
    r = record_from_stream(timed, prompt="hi", start_s=10.0)
    assert r.success and r.usage_seen and r.saw_done and r.error == ""
    assert (r.prompt_tokens, r.output_tokens) == (5, 4)
    # Non-empty chunks are lines 0, 5 and 7; the empty one (line 3) is not a token time.
    assert r.token_times_s == pytest.approx([10.0, 10.5, 10.7])
    assert r.ttft_s == pytest.approx(0.0) and r.itls_s == pytest.approx([0.5, 0.2])
    assert r.e2el_s == pytest.approx(1.1)  # [DONE] is line 11
    assert r.tpot_s == pytest.approx(1.1 / 3)
    assert r.generated_text == "Hello big world"


def test_stream_without_usage_counts_chunks_and_says_so():
    lines = [line for line in STREAM.splitlines() if "usage\":{" not in line]
    r = record_from_stream([(float(i), line) for i, line in enumerate(lines)], prompt=[7, 8, 9])
    assert r.success and not r.usage_seen
    assert r.output_tokens == 3 and r.prompt_tokens == 3  # token-id prompt: its length
    m = compute_metrics([r], 1.0)
    assert m["usage_missing"] == 1 and "no usage chunk" in format_summary(m)


def test_broken_streams_fail_with_a_reason():
    no_done = [line for line in STREAM.splitlines() if "[DONE]" not in line]
    r = record_from_stream([(0.0, line) for line in no_done], prompt="x")
    assert not r.success and "without [DONE]" in r.error
    r = record_from_stream([(0.0, "data: [DONE]")], prompt="x")
    assert not r.success and "no completion chunk" in r.error
    mid = ['data: {"choices":[{"text":"a"}]}', 'data: {"error":{"message":"engine died","type":"server_error"}}']
    r = record_from_stream([(0.0, line) for line in mid], prompt="x")
    assert not r.success and "engine died" in r.error and "server_error" in r.error
    r = record_from_stream([(0.0, 'data: {"choices": "nope"}')], prompt="x")
    assert not r.success and "bad choices" in r.error


def test_error_bodies_give_status_type_and_message():
    body = b'{"error": {"message": "max_tokens must be >= 1", "type": "invalid_request_error", "code": 400}}'
    assert parse_error_body(400, body) == "HTTP 400: invalid_request_error (400): max_tokens must be >= 1"
    assert parse_error_body(502, b"<html>Bad\n gateway</html>") == "HTTP 502: <html>Bad gateway</html>"
    assert parse_error_body(503, b"") == "HTTP 503"
    r = record_from_stream([], prompt="x", status=400)
    assert not r.success and r.status == 400


# ----------------------------------------------------------------------------- the command


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("argv, message", [
    (["--dataset", "ruler"], "RULER prompt builder"),
    (["--dataset", "trace"], "--trace"),
    (["--trace", "x.jsonl"], "--dataset trace"),
    (["--goodput", "ttft:fast"], "--goodput"),
    (["--base-url", "localhost:8000"], "--base-url"),
    (["--json", "/no/such/folder/out.json"], "--json"),
])
def test_bad_arguments_are_named_before_any_request(argv, message):
    if "--base-url" not in argv:  # were a check missed, the run would fail fast, not hang
        argv = argv + ["--base-url", f"http://127.0.0.1:{closed_port()}", "--model", "m"]
    with pytest.raises(ValueError, match=message):
        bench.main(argv)


@pytest.mark.parametrize("argv", [["--request-rate", "0"], ["--burstiness", "-1"], ["--num-prompts", "0"],
                                  ["--random-range-ratio", "1"], ["--max-concurrency", "0"], ["--timeout", "nan"]])
def test_bad_numbers_exit_2_naming_the_option(argv, capsys):
    with pytest.raises(SystemExit) as err:
        bench.main(argv)
    assert err.value.code == 2 and argv[0] in capsys.readouterr().err


def test_a_run_against_a_closed_port_fails_every_request_and_reports(tmp_path, capsys):
    out = tmp_path / "r.json"
    seen = []

    def ruler(args):
        seen.append((args.ruler_task, args.ruler_length, args.num_prompts))
        return [WorkItem([1, 2, 3], 2), WorkItem("abc", 2)]

    argv = ["--base-url", f"http://127.0.0.1:{closed_port()}/v1/", "--model", "m", "--dataset", "ruler",
            "--ruler-length", "512", "--max-concurrency", "1", "--timeout", "5", "--json", str(out), "--api-key", "sk-x"]
    assert bench.main(argv, ruler_source=ruler) == 1
    assert seen == [("niah_single_1", 512, 8)]
    result = json.loads(out.read_text())
    assert result["completed"] == 0 and result["failed"] == 2 and result["errors"]
    assert "ConnectError" in result["errors"][0]
    assert result["args"]["request_rate"] == "inf" and "api_key" not in result["args"]
    assert not result["args"]["base_url"].endswith("/v1")
    assert [r["status"] for r in result["per_request"]] == [None, None]
    assert "Successful requests:                     0" in capsys.readouterr().out


class CannedCompletions(BaseHTTPRequestHandler):
    """Streams max_tokens chunks (the second one empty), a usage chunk and [DONE]; answers
    max_tokens 99 with an OpenAI error body."""

    protocol_version = "HTTP/1.1"
    auth: list = []

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.auth.append(self.headers.get("Authorization"))
        if body["max_tokens"] == 99:
            error = json.dumps({"error": {"message": "too long", "type": "invalid_request_error", "code": 400}})
            self.send_response(400)
            self.send_header("Content-Length", str(len(error)))
            self.end_headers()
            self.wfile.write(error.encode())
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        n = body["max_tokens"]
        chunks = [{"choices": [{"index": 0, "text": "" if i == 1 else f"t{i}", "finish_reason": None}]} for i in range(n)]
        chunks.append({"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": n, "total_tokens": 11 + n}})
        for payload in [json.dumps(c) for c in chunks] + ["[DONE]"]:
            data = f"data: {payload}\n\n".encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), CannedCompletions)
    srv.daemon_threads = True
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    CannedCompletions.auth = []
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_run_benchmark_paces_caps_and_records(server):
    items = [WorkItem([1, 2, 3], 4), WorkItem("hi", 99), WorkItem("hi", 1), WorkItem([4], 3)]
    records, duration = asyncio.run(bench.run_benchmark(server, "m", items, [0.0, 0.0, 0.15, 0.15],
                                                        api_key="sk-1", max_concurrency=1, timeout_s=10))
    first, failed, one, last = records  # submission order, whatever order they ran in
    assert (first.success, first.output_tokens, first.prompt_tokens, first.usage_seen) == (True, 4, 11, True)
    assert len(first.token_times_s) == 3 and first.generated_text == "t0t2t3"
    assert not failed.success and failed.status == 400 and "too long" in failed.error
    assert one.success and one.output_tokens == 1 and one.tpot_s is None and last.output_tokens == 3
    assert min(one.start_s, last.start_s) - first.start_s >= 0.149  # not sent before its arrival
    spans = sorted((r.start_s, r.end_s) for r in records)
    assert all(b[0] >= a[1] for a, b in zip(spans, spans[1:]))  # max_concurrency 1: never overlapping
    assert duration >= 0.15 and CannedCompletions.auth == ["Bearer sk-1"] * 4
