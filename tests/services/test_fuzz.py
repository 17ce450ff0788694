"""The fuzz suite: every RPC of every lmstack service, requests built from the proto descriptors.

For each method of ``lmstack.v1`` (and the health service), a hypothesis strategy is derived from
the request message's descriptor, so a field added to the proto is fuzzed without touching this
file: every field set or unset, random values beside the extremes (the smallest and largest
floats, NaN, +-inf, -0.0, int64/int32 bounds, empty, huge, NUL-laden, path-like and colon-laden
strings, valid-looking and malformed ids, long repeated fields), messages nested, and, for every
method, bytes that are not a message at all. Calls go over real channels to real servers
(inference and tokenizer on tiny checkpoints, fine-tuning on a real redis-server) while
well-formed **beside-streams** run throughout: CompleteStream requests whose tokens must equal
the reference, tokenizer round trips, fine-tuning reads.

What must hold: no call ends ``UNKNOWN``, ``INTERNAL``, ``UNAVAILABLE``, ``DATA_LOSS`` or
``UNIMPLEMENTED`` (the servers are up and every input error has its code), and every beside-stream
completes with its expected result.

Cost: ``LMSTACK_FUZZ_EXAMPLES`` cases per method (default 50: 1,000+ cases over the 21 methods, a
couple of minutes on a loaded 2-core machine), derandomized so CI runs the same cases each time.
A longer developer run, random each time::

    LMSTACK_FUZZ_EXAMPLES=2000 LMSTACK_FUZZ_RANDOM=1 python -m pytest -q tests/services/test_fuzz.py
"""

from __future__ import annotations

import collections
import math
import os
import shutil
import threading

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor as FD
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.client import Client
from services.config import InferenceSettings, TokenizerSettings
from services.finetune.client import FineTuneClient
from services.finetune.settings import FineTuneSettings
from services.gen.lmstack.v1 import finetune_pb2, inference_pb2, tokenizer_pb2
from tests.helpers import GPT2_TIKTOKEN
from tests.helpers.servers import ServerThread

EXAMPLES = int(os.environ.get("LMSTACK_FUZZ_EXAMPLES", "50"))
RANDOM = os.environ.get("LMSTACK_FUZZ_RANDOM") == "1"
FORBIDDEN = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE,
             grpc.StatusCode.DATA_LOSS, grpc.StatusCode.UNIMPLEMENTED}
CALL_TIMEOUT_S = 120.0
STREAM_WINDOW_S = 15.0  # a response stream is read this long at most (health's Watch never ends)
MAX_STREAM_ITEMS = 40
ENDLESS = {"/grpc.health.v1.Health/Watch"}  # streams that never end by design: read the first answer only

SERVICES = [inference_pb2.DESCRIPTOR.services_by_name["InferenceService"],
            tokenizer_pb2.DESCRIPTOR.services_by_name["TokenizerService"],
            finetune_pb2.DESCRIPTOR.services_by_name["FineTuningService"],
            health_pb2.DESCRIPTOR.services_by_name["Health"]]
METHODS = [m for s in SERVICES for m in s.methods]


# --- values ----------------------------------------------------------------------------------------
HUGE = "x" * (1 << 20)
EXTREME_STRINGS = ["", " ", "\x00", "\x00" * 64, "a" * 300, "m" * 5000, HUGE, "😀" * 20_000, "日本語" * 1000,
                   ":", "a:b:c", "../../etc/passwd", "/", ".", "..", "ftjob-", "ftjob-000000000000",
                   "ftjob-000000000000:events", "ds-000000000000", "ds-000000000000:data", "1-0", "0-0", "99999",
                   "²", "-1", "+inf", "nan", "<|endoftext|>" * 50, "\n" * 1000, "tiny", "gpt2", "qa", "io",
                   "ft:tiny:x:000000000000", "*", "%s%n", "\ufeff", "\u202e", "\\", "'\";--"]
FLOAT32_MAX = 3.4028234663852886e38
EXTREME_FLOATS = [0.0, -0.0, 1.0, -1.0, 1e-38, -1e-38, 1e-45, 5e-324, 1e-300, FLOAT32_MAX, -FLOAT32_MAX,
                  1.7976931348623157e308, math.inf, -math.inf, math.nan, 0.5, 2.0, 100.0, 1e9]
INT_BOUNDS = {FD.TYPE_INT32: (-(2**31), 2**31 - 1), FD.TYPE_SINT32: (-(2**31), 2**31 - 1),
              FD.TYPE_SFIXED32: (-(2**31), 2**31 - 1), FD.TYPE_INT64: (-(2**63), 2**63 - 1),
              FD.TYPE_SINT64: (-(2**63), 2**63 - 1), FD.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
              FD.TYPE_UINT32: (0, 2**32 - 1), FD.TYPE_FIXED32: (0, 2**32 - 1),
              FD.TYPE_UINT64: (0, 2**64 - 1), FD.TYPE_FIXED64: (0, 2**64 - 1)}
JSONL = [b'{"prompt": "Q: 1?\\nA:", "completion": " 1"}\n', b'{"text": "hello"}\n', b"\n", b"{", b"\xff\xfe",
         b'{"prompt": 1, "completion": "x"}\n', b'{"text": "' + b"y" * 70_000 + b'"}\n']


def _ints(lo: int, hi: int):
    edges = sorted({lo, hi, 0, 1, -1 if lo < 0 else 0, 2, 8, 64, 100, 128, 1000, 65536, 1 << 20})
    return st.one_of(st.sampled_from([e for e in edges if lo <= e <= hi]), st.integers(lo, hi))


def scalar_strategy(field):
    t = field.type
    if t in INT_BOUNDS:
        return _ints(*INT_BOUNDS[t])
    if t in (FD.TYPE_FLOAT, FD.TYPE_DOUBLE):
        width = 32 if t == FD.TYPE_FLOAT else 64
        return st.one_of(st.sampled_from(EXTREME_FLOATS), st.floats(width=width, allow_nan=True, allow_infinity=True))
    if t == FD.TYPE_BOOL:
        return st.booleans()
    if t == FD.TYPE_STRING:
        return st.one_of(st.sampled_from(EXTREME_STRINGS), st.text(max_size=200),
                         st.text(alphabet=st.characters(codec="utf-8"), max_size=2000))
    if t == FD.TYPE_BYTES:
        return st.one_of(st.binary(max_size=300), st.lists(st.sampled_from(JSONL), max_size=20).map(b"".join))
    if t == FD.TYPE_ENUM:
        known = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(known), st.integers(-(2**31), 2**31 - 1))
    raise AssertionError(f"no strategy for {field.full_name} (type {t})")


# Values that reach deeper code for fields of these names (a served model, an id of the right
# shape); they are offered beside the generic values, never instead of them, and a field without
# a hint (a new one, say) is fuzzed with the generic values alone.
_JOB = st.from_regex(r"ftjob-[0-9a-f]{12}", fullmatch=True)
_DATASET = st.from_regex(r"ds-[0-9a-f]{12}", fullmatch=True)
HINTS = {"model": st.sampled_from(["", "tiny", "gpt2"]), "base_model": st.sampled_from(["", "tiny"]),
         "style": st.sampled_from(["", "qa", "io", "arrow"]), "id": st.one_of(_JOB, _DATASET), "job_id": _JOB,
         "dataset_id": _DATASET, "after_event_id": st.from_regex(r"[0-9]{1,13}-[0-9]{1,3}", fullmatch=True),
         "page_token": st.from_regex(r"[0-9]{1,16}", fullmatch=True)}


def field_strategy(field, depth: int):
    if field.type == FD.TYPE_MESSAGE:
        if field.message_type.GetOptions().map_entry:
            return None  # no map fields in lmstack.v1
        one = message_strategy(field.message_type, depth + 1)
    else:
        one = scalar_strategy(field)
        if field.name in HINTS and field.type == FD.TYPE_STRING:
            one = st.one_of(HINTS[field.name], one)
    if field.is_repeated:
        if field.type == FD.TYPE_MESSAGE:
            return st.lists(one, max_size=5 if depth else 70)
        long = st.sampled_from(SMALL[field.type]).map(lambda v: [v] * 70_000)  # long, each value small
        return st.one_of(st.lists(one, max_size=20), long)
    return one


def message_strategy(descriptor, depth: int = 0):
    cls = message_factory.GetMessageClass(descriptor)
    if depth > 2:
        return st.just(cls())
    optional = {}
    for f in descriptor.fields:
        s = field_strategy(f, depth)
        if s is not None:
            optional[f.name] = s
    return st.fixed_dictionaries({}, optional=optional).map(lambda kw: cls(**kw))


SMALL = {**{t: [0, 1, 50256, 2**31 - 1] for t in INT_BOUNDS}, FD.TYPE_FLOAT: [0.0, math.nan],
         FD.TYPE_DOUBLE: [math.inf], FD.TYPE_BOOL: [True], FD.TYPE_STRING: ["", "a", ":"], FD.TYPE_BYTES: [b"{"],
         FD.TYPE_ENUM: [0, 1, 99]}
GARBAGE = [b"\xff" * 11, b"\x0a\xff\xff\xff\x0f", b"\x08", b"\x00", b"\x0a\x05ab", b"\x12\x02\xc3\x28"]


def request_strategy(method):
    message = message_strategy(method.input_type).map(lambda m: m.SerializeToString())
    raw = st.one_of(st.sampled_from(GARBAGE), st.binary(max_size=64))
    one = st.one_of(message, message, message, raw)
    if method.client_streaming:
        return st.lists(one, max_size=6)
    return one


# --- the servers -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stack(tiny_models, tmp_path_factory):
    from tests.conftest import RedisServer

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed (apt-get install redis-server)")
    root = tmp_path_factory.mktemp("fuzz")
    (root / "redis").mkdir()
    redis = RedisServer(root / "redis")
    redis.start()
    tiny = f"tiny={tiny_models['tiny']}"
    servers = {
        "lmstack.v1.InferenceService": ServerThread(InferenceSettings(
            models=[tiny], model_store=str(root / "store"), port=0, max_batch_size=8), "inference",
            __import__("services.inference.__main__", fromlist=["setup"]).setup),
        "lmstack.v1.TokenizerService": ServerThread(TokenizerSettings(
            models=[f"gpt2={GPT2_TIKTOKEN}", tiny], port=0), "tokenizer",
            __import__("services.tokenizer.__main__", fromlist=["setup"]).setup),
        "lmstack.v1.FineTuningService": ServerThread(FineTuneSettings(
            models=[tiny], model_store=str(root / "store"), redis_url=redis.url, port=0, watch_max_s=0.5),
            "finetune", __import__("services.finetune.__main__", fromlist=["setup"]).setup),
    }
    for s in servers.values():
        s.start()
    servers["grpc.health.v1.Health"] = servers["lmstack.v1.InferenceService"]
    channels = {name: grpc.insecure_channel(s.target, options=[("grpc.max_send_message_length", 1 << 28),
                                                               ("grpc.max_receive_message_length", 1 << 28)])
                for name, s in servers.items()}
    beside = BesideStreams(servers)
    beside.start()
    yield channels
    beside.stop()
    for ch in channels.values():
        ch.close()
    for name, s in servers.items():
        if name != "grpc.health.v1.Health":
            s.stop()
    redis.stop()
    beside.check()


class BesideStreams:
    """Well-formed traffic running the whole time; each call must complete with its expected result."""

    PROMPT = "Once upon a time"

    def __init__(self, servers):
        self.inference = servers["lmstack.v1.InferenceService"].target
        self.tokenizer = servers["lmstack.v1.TokenizerService"].target
        self.finetune = servers["lmstack.v1.FineTuningService"].target
        self.stop_event = threading.Event()
        self.errors: list[str] = []
        self.completed = collections.Counter()
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        with Client(self.inference) as c:
            self.expected = [t for ch in c.complete_stream(self.PROMPT, max_tokens=24, temperature=0, ignore_eos=True)
                             for t in ch.token_ids]
        for target in (self._stream, self._stream, self._tokenize, self._finetune):
            t = threading.Thread(target=self._loop, args=(target,), daemon=True)
            t.start()
            self.threads.append(t)

    def _loop(self, fn) -> None:
        pause = 0.0 if fn.__name__ == "_stream" else 0.5  # streams back to back; the rest now and then
        while not self.stop_event.wait(pause):
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - every failure of a well-formed call is reported
                self.errors.append(f"{fn.__name__}: {e!r}"[:500])

    def _stream(self) -> None:
        with Client(self.inference, timeout=CALL_TIMEOUT_S) as c:
            chunks = list(c.complete_stream(self.PROMPT, max_tokens=24, temperature=0, ignore_eos=True))
            got = [t for ch in chunks for t in ch.token_ids]
            if got != self.expected or chunks[-1].finish_reason != "length":
                self.errors.append(f"beside stream got {got} ({chunks[-1].finish_reason}), expected {self.expected}")
            self.completed["stream"] += 1

    def _tokenize(self) -> None:
        with Client(self.tokenizer, timeout=CALL_TIMEOUT_S) as c:
            text = "beside the fuzz, a round trip"
            if c.decode(c.encode(text)) != text:
                self.errors.append("tokenizer round trip changed the text")
            self.completed["tokenize"] += 1

    def _finetune(self) -> None:
        ft = FineTuneClient(self.finetune, timeout=CALL_TIMEOUT_S)
        try:
            ds = ft.upload_dataset(b'{"prompt": "Q: 1?\\nA:", "completion": " 1"}\n' * 4)
            job = ft.create_job("tiny", ds.id, max_steps=1)
            if ft.get_job(job.id).id != job.id or job.id not in [j.id for j in ft.list_jobs(page_size=1000).jobs]:
                self.errors.append("fine-tuning read did not find its job")
            ft.cancel_job(job.id)
            self.completed["finetune"] += 1
        finally:
            ft.close()

    def stop(self) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(timeout=CALL_TIMEOUT_S + 30)

    def check(self) -> None:
        assert not self.errors, self.errors[:10]
        assert min(self.completed[k] for k in ("stream", "tokenize", "finetune")) >= 1, dict(self.completed)
        print(f"beside-streams completed: {dict(self.completed)}")


# --- the property ------------------------------------------------------------------------------------
CODES: collections.Counter = collections.Counter()


def call(channel, method, request) -> grpc.StatusCode:
    path = f"/{method.containing_service.full_name}/{method.name}"
    try:
        if method.client_streaming:
            channel.stream_unary(path)(iter(request), timeout=CALL_TIMEOUT_S)
        elif method.server_streaming:
            responses = channel.unary_stream(path)(request, timeout=STREAM_WINDOW_S)
            most = 1 if path in ENDLESS else MAX_STREAM_ITEMS
            try:
                for i, _ in enumerate(responses, start=1):
                    if i >= most:
                        break
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.DEADLINE_EXCEEDED:  # our window, not the server's doing
                    raise
            responses.cancel()
        else:
            channel.unary_unary(path)(request, timeout=CALL_TIMEOUT_S)
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        if e.code() in FORBIDDEN:
            raise AssertionError(f"{path} -> {e.code().name}: {e.details()!r}") from None
        return e.code()


@pytest.mark.parametrize("method", METHODS, ids=lambda m: f"{m.containing_service.name}.{m.name}")
def test_no_request_gets_an_unknown_or_internal_error(stack, method):
    channel = stack[method.containing_service.full_name]

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=not RANDOM, database=None,
              suppress_health_check=list(HealthCheck), print_blob=True)
    @given(request_strategy(method))
    def fuzz(request):
        CODES[(method.name, call(channel, method, request).name)] += 1

    fuzz()


def test_at_least_a_thousand_cases_ran(stack):
    total = sum(CODES.values())
    print("status codes per method:", dict(sorted(CODES.items())))
    if EXAMPLES >= 50:
        assert total >= 1000, total
