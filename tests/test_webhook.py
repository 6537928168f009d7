"""POST /webhook: GitHub's real payloads, signatures, body limits, repeats, disorder and concurrency."""

from __future__ import annotations

import json
import random
import socket
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orch_support import (
    FIXTURES,
    SANDBOX_CONFIG,
    fixtures_required,
    job_payload,
    make_config,
    post_webhook,
    sign,
    webhook_headers,
)

FIXTURE_DIR = FIXTURES / "github" / "workflow_job"
MIB = 1024 * 1024

# What each of GitHub's example deliveries leads to on its own: (result prefix, job state or None, pool).
# Their repositories are public; most ask for GitHub-hosted `ubuntu-latest`, so no row is kept.
EXPECTED = {
    "completed.failure.with-organization.payload.json": ("ignored:no-matching-pool", None, None),
    "completed.success.with-organization.payload.json": ("ignored:no-matching-pool", None, None),
    "in_progress.payload.json": ("ignored:no-matching-pool", None, None),
    "in_progress.with-queued-steps.payload.json": ("ignored:repository-not-allowed", None, None),
    "queued.payload.json": ("ignored:no-matching-pool", None, None),
    # `action: queued` with `status: waiting`: a deployment approval is pending.
    "queued.with-deployment.payload.json": ("waiting", "waiting", "k8s"),
    "waiting.payload.json": ("waiting", "waiting", "k8s"),
}


def load_fixture(name: str) -> dict:
    return json.loads((fixtures_required(FIXTURE_DIR) / name).read_text())


def fixture_files() -> list[Path]:
    return sorted(fixtures_required(FIXTURE_DIR).glob("*.json"))


def raw_post(client, body: bytes, headers: dict):
    return client.post("/webhook", content=body, headers=headers)


def job_ids(orch) -> set[int]:
    return {j.id for j in orch.store.jobs()}


# --- GitHub's own example payloads ---------------------------------------------


def test_every_fixture_has_an_expectation():
    names = {p.name for p in fixture_files()}
    assert names == set(EXPECTED), f"fixtures without an expectation here: {names ^ set(EXPECTED)}"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixture_replayed_signed(make_orch, client_for, name):
    orch = make_orch()
    client = client_for(orch)
    body = (FIXTURE_DIR / name).read_bytes()  # the exact bytes, as GitHub signs them
    payload = json.loads(body)
    r = raw_post(client, body, webhook_headers(body))
    assert r.status_code == 202, r.text
    result, state, pool = EXPECTED[name]
    assert r.json()["result"] == result
    job = orch.store.get_job(payload["workflow_job"]["id"])
    if state is None:
        assert job is None
    else:
        assert (job.state, job.pool, job.repository) == (state, pool, payload["repository"]["full_name"])
    assert orch.scaler.run_once() == []
    assert orch.sandbox_world.live() == []


def test_waiting_fixture_launches_only_once_queued(make_orch, client_for):
    orch = make_orch()
    client = client_for(orch)
    for name in ("waiting.payload.json", "queued.with-deployment.payload.json"):
        body = (FIXTURE_DIR / name).read_bytes()
        assert raw_post(client, body, webhook_headers(body)).status_code == 202
    waiting = load_fixture("waiting.payload.json")
    job_id = waiting["workflow_job"]["id"]
    assert orch.store.get_job(job_id).state == "waiting"
    assert orch.scaler.run_once() == []

    approved = load_fixture("queued.with-deployment.payload.json")
    approved["workflow_job"]["status"] = "queued"
    r = post_webhook(client, approved)
    assert r.json()["result"] == "queued"
    assert orch.store.get_job(job_id).state == "queued"
    outcomes = orch.scaler.run_once()
    assert [o.result for o in outcomes] == ["launched"]
    inst = orch.store.get_instance(outcomes[0].instance)
    assert inst.pool == "k8s" and inst.job_id == job_id
    assert inst.labels == ["self-hosted", "linux", "x64", "k8s"]

    # Completed deliveries come without `installation`; the job still ends.
    done = load_fixture("completed.success.with-organization.payload.json")
    assert "installation" not in done
    done["workflow_job"].update(id=job_id, run_id=approved["workflow_job"]["run_id"], labels=["self-hosted", "k8s"], runner_name=None)
    done["repository"] = approved["repository"]
    r = post_webhook(client, done)
    assert r.status_code == 202 and r.json()["result"] == "completed"
    job = orch.store.get_job(job_id)
    assert job.state == "completed" and job.conclusion == "success"


def test_public_repository_ignored_when_not_allowed(make_orch, client_for, sqlite_url):
    text = SANDBOX_CONFIG.replace("allow_public_repositories: true", "allow_public_repositories: false")
    orch = make_orch(make_config(sqlite_url, text=text))
    client = client_for(orch)
    body = (FIXTURE_DIR / "waiting.payload.json").read_bytes()
    r = raw_post(client, body, webhook_headers(body))
    assert r.status_code == 202 and r.json()["result"] == "ignored:public-repository"
    job = orch.store.get_job(json.loads(body)["workflow_job"]["id"])
    assert job.state == "ignored" and job.reason == "public-repository"
    approved = load_fixture("queued.with-deployment.payload.json")
    approved["workflow_job"]["status"] = "queued"
    assert post_webhook(client, approved).json()["result"] == "ignored:known"
    assert orch.scaler.run_once() == []


# --- signatures and bodies -------------------------------------------------------


def test_wrong_secret_is_401(make_orch, client_for):
    orch = make_orch()
    r = post_webhook(client_for(orch), job_payload(job_id=5), secret="not-the-secret")
    assert r.status_code == 401
    assert orch.store.get_job(5) is None


def test_missing_signature_is_401(make_orch, client_for):
    orch = make_orch()
    body = json.dumps(job_payload(job_id=5)).encode()
    headers = webhook_headers(body)
    del headers["X-Hub-Signature-256"]
    assert raw_post(client_for(orch), body, headers).status_code == 401
    assert orch.store.get_job(5) is None


def test_sha1_signature_alone_counts_as_missing(make_orch, client_for):
    import hashlib
    import hmac

    from orch_support import WEBHOOK_SECRET

    orch = make_orch()
    body = json.dumps(job_payload(job_id=5)).encode()
    headers = webhook_headers(body)
    del headers["X-Hub-Signature-256"]
    headers["X-Hub-Signature"] = "sha1=" + hmac.new(WEBHOOK_SECRET.encode(), body, hashlib.sha1).hexdigest()
    assert raw_post(client_for(orch), body, headers).status_code == 401
    assert orch.store.get_job(5) is None


def test_signature_over_other_bytes_is_401(make_orch, client_for):
    orch = make_orch()
    body = json.dumps(job_payload(job_id=5)).encode()
    headers = webhook_headers(body)
    assert raw_post(client_for(orch), body + b" ", headers).status_code == 401


def _big_body() -> bytes:
    return b"{" + b" " * (MIB - 1) + b"}"  # 1 MiB + 1 byte, valid JSON


def test_body_over_one_mib_is_413(make_orch, client_for):
    client = client_for(make_orch())
    body = _big_body()
    assert len(body) == MIB + 1
    assert raw_post(client, body, webhook_headers(body)).status_code == 413


def test_body_of_exactly_one_mib_is_read(make_orch, client_for):
    client = client_for(make_orch())
    body = b"{" + b" " * (MIB - 2) + b"}"
    assert len(body) == MIB
    r = raw_post(client, body, webhook_headers(body))
    assert r.status_code == 400  # read and verified; `{}` is not a workflow_job payload


def test_body_over_one_mib_with_lying_content_length_is_413(make_orch, client_for):
    client = client_for(make_orch())
    body = _big_body()
    headers = {**webhook_headers(body), "Content-Length": "100"}
    r = raw_post(client, body, headers)
    assert r.request.headers["content-length"] == "100"
    assert r.status_code == 413


def test_streamed_body_without_content_length_is_413(make_orch, client_for):
    client = client_for(make_orch())
    body = _big_body()

    def chunks():
        for i in range(0, len(body), 64 * 1024):
            yield body[i:i + 64 * 1024]

    r = client.post("/webhook", content=chunks(), headers=webhook_headers(body))
    assert "content-length" not in r.request.headers
    assert r.status_code == 413


def test_streamed_body_without_content_length_is_read_whole(make_orch, client_for):
    orch = make_orch()
    client = client_for(orch)
    body = json.dumps(job_payload(job_id=14)).encode()

    def chunks():
        for i in range(0, len(body), 50):
            yield body[i:i + 50]

    r = client.post("/webhook", content=chunks(), headers=webhook_headers(body))
    assert "content-length" not in r.request.headers
    assert r.status_code == 202 and r.json() == {"result": "queued", "job": 14}
    assert orch.store.get_job(14).state == "queued"


def test_declared_length_over_the_cap_is_413_before_reading(make_orch, client_for):
    client = client_for(make_orch())
    body = json.dumps(job_payload(job_id=15)).encode()
    r = raw_post(client, body, {**webhook_headers(body), "Content-Length": str(MIB + 1)})
    assert r.status_code == 413 and r.json() == {"result": "too-large"}


def test_other_methods_are_405(make_orch, client_for):
    client = client_for(make_orch())
    for method in ("GET", "PUT", "DELETE"):
        r = client.request(method, "/webhook")
        assert r.status_code == 405, (method, r.text)
        assert r.headers["allow"] == "POST"


def test_answers_are_the_json_they_always_were(make_orch, client_for):
    from fastapi.responses import JSONResponse

    client = client_for(make_orch())
    first = post_webhook(client, job_payload(job_id=16), delivery="d-16")
    again = post_webhook(client, job_payload(job_id=16), delivery="d-16")
    body = json.dumps({"zen": "Speak like a human."}).encode()
    ping = raw_post(client, body, webhook_headers(body, event="ping"))
    bad = post_webhook(client, b"not json")
    for r, status, content in (
        (first, 202, {"result": "queued", "job": 16}),
        (again, 202, {"result": "duplicate", "job": 16}),
        (ping, 202, {"result": "ping"}),
        (bad, 400, {"result": "bad-payload", "error": "body is not JSON"}),
    ):
        assert r.status_code == status
        assert r.headers["content-type"] == "application/json"
        assert r.content == JSONResponse(content).body  # byte for byte


def test_deliveries_are_counted_by_result(make_orch, client_for):
    from prometheus_client import REGISTRY

    def count(result: str) -> float:
        return REGISTRY.get_sample_value("orchestrator_webhook_deliveries_total", {"result": result}) or 0.0

    client = client_for(make_orch())
    before = {r: count(r) for r in ("queued", "duplicate", "bad-signature", "ignored")}
    post_webhook(client, job_payload(job_id=17), delivery="d-17")
    post_webhook(client, job_payload(job_id=17), delivery="d-17")
    post_webhook(client, job_payload(job_id=18), secret="wrong")
    post_webhook(client, job_payload(job_id=19), event="push")
    assert {r: count(r) - n for r, n in before.items()} == {"queued": 1, "duplicate": 1, "bad-signature": 1, "ignored": 1}


def test_non_json_is_400(make_orch, client_for):
    client = client_for(make_orch())
    for body in (b"not json", b"\xff\xfe\x00garbage", b"", b"{\"action\": "):
        r = raw_post(client, body, webhook_headers(body))
        assert r.status_code == 400, (body, r.text)


@pytest.mark.parametrize(
    "payload",
    [
        {"zen": "Keep it logically awesome."},
        [1, 2, 3],
        "workflow_job",
        {"action": "queued", "workflow_job": {"id": 1}},
        {"action": "queued", "workflow_job": {"labels": []}, "repository": {"full_name": "octo-org/models"}},
        {"action": "queued", "workflow_job": {"id": "x"}, "repository": {"full_name": "octo-org/models"}},
        {"action": "queued", "workflow_job": {"id": 1, "labels": "gpu"}, "repository": {"full_name": "octo-org/models"}},
    ],
)
def test_json_that_is_not_a_job_payload_is_400(make_orch, client_for, payload):
    orch = make_orch()
    r = post_webhook(client_for(orch), json.dumps(payload).encode())
    assert r.status_code == 400, r.text
    assert orch.store.jobs() == []


@pytest.mark.parametrize(
    "field, value",
    [
        ("id", 2**64),
        ("id", float("inf")),
        ("id", -3),
        ("id", True),
        ("run_attempt", 2**40),
        ("labels", ["self-hosted", "x" * 5000]),
        ("labels", ["self-hosted", "gpu-t4\u0000"]),
    ],
)
def test_values_that_cannot_be_stored_are_400(make_orch, client_for, field, value):
    orch = make_orch()
    payload = job_payload(job_id=8)
    payload["workflow_job"][field] = value
    r = post_webhook(client_for(orch), json.dumps(payload).encode())
    assert r.status_code == 400, r.text


def test_bad_repository_name_is_400(make_orch, client_for):
    orch = make_orch()
    for name in ("no-slash", "a/b/c", "octo-org/" + "m" * 300, "octo\u0000/x"):
        r = post_webhook(client_for(orch), job_payload(job_id=8, repo="octo-org/models") | {"repository": {"full_name": name}})
        assert r.status_code == 400, (name, r.text)


def test_unknown_action_is_acknowledged_and_ignored(make_orch, client_for):
    orch = make_orch()
    r = post_webhook(client_for(orch), job_payload("frobnicated", job_id=9))
    assert r.status_code == 202 and r.json()["result"] == "ignored:action"
    assert orch.store.get_job(9) is None


def test_push_event_is_202_and_changes_nothing(make_orch, client_for):
    orch = make_orch()
    body = json.dumps({"ref": "refs/heads/main", "repository": {"full_name": "octo-org/models"}}).encode()
    r = raw_post(client_for(orch), body, webhook_headers(body, event="push"))
    assert r.status_code == 202
    # A workflow_job body under another event name is still not a job.
    r = post_webhook(client_for(orch), job_payload(job_id=12), event="push")
    assert r.status_code == 202
    assert orch.store.jobs() == []


def test_ping_is_202(make_orch, client_for):
    orch = make_orch()
    body = json.dumps({"zen": "Design for failure.", "hook_id": 1}).encode()
    r = raw_post(client_for(orch), body, webhook_headers(body, event="ping"))
    assert r.status_code == 202 and r.json()["result"] == "ping"


header_text = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80)
header_bytes = st.binary(max_size=60).map(lambda b: bytes(c for c in b if c >= 0x20 and c != 0x7F))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def near_payloads(draw) -> bytes:
    """A real-looking job payload with a few fields swapped for arbitrary JSON."""
    payload = job_payload(draw(st.sampled_from(["queued", "waiting", "in_progress", "completed", "x"])), job_id=draw(st.integers(1, 50)))
    for _ in range(draw(st.integers(0, 3))):
        section = draw(st.sampled_from(["workflow_job", "repository", "installation", None]))
        if section is None:
            payload[draw(st.sampled_from(["action", "workflow_job", "repository", "installation"]))] = draw(json_values)
        elif isinstance(payload.get(section), dict):
            key = draw(st.sampled_from(sorted(payload[section]) + ["extra"]))
            payload[section][key] = draw(json_values)
    return json.dumps(payload).encode()


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    body=st.one_of(st.binary(max_size=2048), near_payloads(), json_values.map(lambda v: json.dumps(v).encode())),
    event=st.one_of(st.none(), st.sampled_from(["workflow_job", "ping", "push"]), header_text),
    signing=st.sampled_from(["valid", "wrong", "missing", "sha1", "garbage"]),
    delivery=st.one_of(st.none(), header_text, header_bytes, st.uuids().map(str)),
    garbage=header_bytes,
)
def test_no_body_or_headers_give_5xx(make_orch, client_for, body, event, signing, delivery, garbage):
    client = getattr(make_orch, "fuzz_client", None)
    if client is None:  # one app for all examples: hypothesis calls this body many times per fixture
        client = make_orch.fuzz_client = client_for(make_orch())
    headers: dict = {"Content-Type": "application/json"}
    if event is not None:
        headers["X-GitHub-Event"] = event
    if delivery is not None:
        headers["X-GitHub-Delivery"] = delivery
    if signing == "valid":
        headers["X-Hub-Signature-256"] = sign(body)
    elif signing == "wrong":
        headers["X-Hub-Signature-256"] = sign(body, "wrong")
    elif signing == "sha1":
        headers["X-Hub-Signature"] = "sha1=" + "0" * 40
    elif signing == "garbage":
        headers["X-Hub-Signature-256"] = b"sha256=" + garbage
    r = raw_post(client, body, headers)
    assert r.status_code < 500, (r.status_code, r.text)
    assert r.status_code in (202, 400, 401, 413)


# --- repeats and disorder ----------------------------------------------------------


def test_same_delivery_twice_is_one_job_and_a_duplicate(make_orch, client_for):
    orch = make_orch()
    client = client_for(orch)
    first = post_webhook(client, job_payload(job_id=21), delivery="d-21")
    second = post_webhook(client, job_payload(job_id=21), delivery="d-21")
    assert first.status_code == second.status_code == 202
    assert first.json()["result"] == "queued"
    assert second.json()["result"] == "duplicate"
    assert job_ids(orch) == {21}


def test_same_job_under_two_delivery_ids_is_one_job(make_orch, client_for):
    orch = make_orch()
    client = client_for(orch)
    assert post_webhook(client, job_payload(job_id=22), delivery="a").json()["result"] == "queued"
    assert post_webhook(client, job_payload(job_id=22), delivery="b").json()["result"] == "unchanged"
    assert job_ids(orch) == {22}
    assert [o.result for o in orch.scaler.run_once()] == ["launched"]
    assert len(orch.store.live_instances()) == 1


def test_completed_before_queued(make_orch, client_for):
    orch = make_orch()
    client = client_for(orch)
    post_webhook(client, job_payload("completed", job_id=23, conclusion="success", runner_name="elsewhere"))
    r = post_webhook(client, job_payload("queued", job_id=23))
    assert r.status_code == 202
    job = orch.store.get_job(23)
    assert job.state == "completed" and job.conclusion == "success"
    assert orch.scaler.run_once() == []
    assert orch.sandbox_world.live() == []


def test_cancelled_before_queued(make_orch, client_for):
    orch = make_orch()
    client = client_for(orch)
    post_webhook(client, job_payload("completed", job_id=24, conclusion="cancelled"))
    post_webhook(client, job_payload("queued", job_id=24))
    assert orch.store.get_job(24).state == "cancelled"
    assert orch.scaler.run_once() == []


def test_in_progress_before_queued(make_orch, client_for):
    orch = make_orch()
    client = client_for(orch)
    post_webhook(client, job_payload("in_progress", job_id=25, runner_name="some-runner"))
    post_webhook(client, job_payload("queued", job_id=25))
    job = orch.store.get_job(25)
    assert job.state == "in_progress" and job.runner_name == "some-runner"
    assert orch.scaler.run_once() == []
    assert orch.sandbox_world.live() == []


def test_rerun_attempt_requeues(make_orch, client_for):
    orch = make_orch()
    client = client_for(orch)
    post_webhook(client, job_payload("completed", job_id=26, conclusion="failure"))
    r = post_webhook(client, job_payload("queued", job_id=26, run_attempt=2))
    assert r.json()["result"] == "requeued"
    job = orch.store.get_job(26)
    assert (job.state, job.run_attempt) == ("queued", 2)
    # A late delivery of the first attempt changes nothing.
    assert post_webhook(client, job_payload("completed", job_id=26, conclusion="failure")).json()["result"] == "stale"


# --- many deliveries at once, through a real server ---------------------------------


class LiveServer:
    """The real app under uvicorn on 127.0.0.1, on a socket bound before the thread starts."""

    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(256)  # connections queue here until uvicorn accepts: no start-up wait
        self.url = "http://127.0.0.1:%d" % self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


def _concurrent_deliveries() -> tuple[list[tuple[str, bytes]], set[int], set[int]]:
    """200 deliveries of overlapping jobs: each routed job 4 times under 2 delivery ids."""
    sends: list[tuple[str, bytes]] = []
    routed = set(range(1, 41))
    for job_id in routed:
        labels = ("self-hosted", "gpu-t4") if job_id % 3 else ("Self-Hosted", "k8s")
        body = json.dumps(job_payload("queued", job_id=job_id, labels=labels)).encode()
        sends += [(f"d-{job_id}-{k % 2}", body) for k in range(4)]
    ignored = set(range(100, 110))
    for job_id in ignored:  # self-hosted but no pool: a row that says why
        body = json.dumps(job_payload("queued", job_id=job_id, labels=("self-hosted", "tpu"))).encode()
        sends += [(f"d-{job_id}-{k}", body) for k in range(2)]
    for job_id in range(110, 120):  # GitHub-hosted: no row
        body = json.dumps(job_payload("queued", job_id=job_id, labels=("ubuntu-latest",))).encode()
        sends += [(f"d-{job_id}-{k}", body) for k in range(2)]
    random.Random(7).shuffle(sends)
    assert len(sends) == 200
    return sends, routed, ignored


def test_concurrent_deliveries_through_uvicorn(make_orch, any_db_url):
    from orchestrator.app import create_app

    orch = make_orch(make_config(any_db_url))
    sends, routed, ignored = _concurrent_deliveries()
    local = threading.local()

    def send(item):
        guid, body = item
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = httpx.Client(base_url=server.url, timeout=60)
        r = client.post("/webhook", content=body, headers=webhook_headers(body, delivery=guid))
        return guid, r.status_code, r.json().get("result")

    with LiveServer(create_app(orch, background=False)) as server:
        with ThreadPoolExecutor(32) as pool:
            answers = list(pool.map(send, sends))

    assert all(status == 202 for _, status, _ in answers), Counter(status for _, status, _ in answers)
    jobs = {j.id: j for j in orch.store.jobs()}
    assert set(jobs) == routed | ignored
    assert {j.id for j in jobs.values() if j.state == "queued"} == routed
    assert {j.id for j in jobs.values() if j.state == "ignored"} == ignored
    assert all(jobs[i].pool == ("gpu-t4" if i % 3 else "k8s") for i in routed)
    per_job = Counter()
    for guid, _, result in answers:
        per_job[(int(guid.split("-")[1]), result)] += 1
    for job_id in routed:
        # One delivery queued it; its repeat and the other id's two sends changed nothing.
        assert per_job[(job_id, "queued")] == 1, per_job
        assert per_job[(job_id, "duplicate")] == 2, per_job
        assert per_job[(job_id, "unchanged")] == 1, per_job
    launched = [o for o in orch.scaler.run_once() if o.result == "launched"]
    assert launched
    per_job_instances = Counter(i.job_id for i in orch.store.instances())
    assert max(per_job_instances.values()) == 1


# --- group commit ------------------------------------------------------------------------


def _item(job_id: int, guid: str, action: str = "queued", **kw):
    from orchestrator.core.intake import JobEvent

    return (JobEvent.from_payload(job_payload(action, job_id=job_id, **kw)), (guid, "workflow_job"), "webhook")


def test_batch_results_in_order_with_repeats_inside_the_batch(make_orch):
    orch = make_orch()
    results = orch.intake.handle_many([
        _item(61, "a"),
        _item(61, "a"),  # the same delivery again, in the same batch
        _item(61, "b"),  # the same job under another id
        _item(62, "c", labels=("self-hosted", "nope")),
        _item(63, "d", labels=("ubuntu-latest",)),
        _item(64, "e"),
        _item(64, "f"),
    ])
    assert results == ["queued", "duplicate", "unchanged", "ignored:no-matching-pool", "ignored:no-matching-pool", "queued", "unchanged"]
    assert {j.id: j.state for j in orch.store.jobs()} == {61: "queued", 62: "ignored", 64: "queued"}


def test_batch_mixes_new_jobs_and_updates(make_orch):
    orch = make_orch()
    done = _item(71, "x2", "completed", conclusion="success", runner_name="elsewhere")
    results = orch.intake.handle_many([_item(71, "x1"), done, _item(72, "x3")])
    assert results == ["queued", "completed", "queued"]
    assert orch.store.get_job(71).state == "completed" and orch.store.get_job(72).state == "queued"


def test_one_bad_event_does_not_fail_its_batch(make_orch, monkeypatch):
    orch = make_orch()
    real_apply = orch.intake._new_job_row

    def flaky(ev, source, on_demand_only):
        if ev.job_id == 82:
            raise RuntimeError("cannot record this one")
        return real_apply(ev, source, on_demand_only)

    monkeypatch.setattr(orch.intake, "_new_job_row", flaky)
    results = orch.intake.handle_many([_item(81, "g1"), _item(82, "g2"), _item(83, "g3")])
    assert results[0] == "queued" and results[2] == "queued"
    assert isinstance(results[1], RuntimeError)
    assert job_ids(orch) == {81, 83}
    # The failed delivery was not recorded as seen: GitHub's redelivery gets a second chance.
    monkeypatch.setattr(orch.intake, "_new_job_row", real_apply)
    assert orch.intake.handle_many([_item(82, "g2")]) == ["queued"]


def test_store_failure_is_503_not_a_crash(make_orch, client_for, monkeypatch):
    orch = make_orch()
    client = client_for(orch)

    def down(items):
        return [ConnectionError("database unreachable")] * len(items)

    monkeypatch.setattr(orch.intake, "handle_many", down)
    r = post_webhook(client, job_payload(job_id=91))
    assert r.status_code == 503 and r.json()["result"] == "store-unavailable"


class _RecordingIntake:
    """Stands in for Intake.handle_many: records batch sizes, answers `queued`, or fails when told."""

    def __init__(self, fail: BaseException | None = None):
        self.batches: list[list] = []
        self.fail = fail

    def handle_many(self, items):
        self.batches.append(list(items))
        if self.fail is not None:
            raise self.fail
        return ["queued"] * len(items)


def _run_batcher(intake, scenario):
    import asyncio

    from orchestrator.api.webhook import _Batcher

    async def main():
        return await scenario(_Batcher(intake, asyncio.get_running_loop()))

    return asyncio.run(main())


def test_a_wave_of_deliveries_is_written_as_one_batch():
    import asyncio

    intake = _RecordingIntake()

    async def scenario(b):
        first = await asyncio.gather(*(b.submit(("first", i)) for i in range(4)))
        # The next wave trickles in, one delivery per loop turn: still one batch of 4.
        waiting = []
        for i in range(4):
            waiting.append(asyncio.ensure_future(b.submit(("second", i))))
            await asyncio.sleep(0)
        return first, await asyncio.gather(*waiting)

    first, second = _run_batcher(intake, scenario)
    assert first == second == ["queued"] * 4
    assert [len(batch) for batch in intake.batches] == [4, 4]


def test_a_short_wave_waits_only_briefly():
    import asyncio

    from orchestrator.api.webhook import _Batcher

    intake = _RecordingIntake()
    waits: list[float] = []

    async def scenario(b):
        call_later = b.loop.call_later

        def timed(delay, *args):
            waits.append(delay)
            return call_later(delay, *args)

        b.loop.call_later = timed  # the only timer a batch waits on
        await asyncio.gather(*(b.submit(("wave", i)) for i in range(8)))
        result = await b.submit(("alone", 0))  # the wave that follows is one delivery
        return result, await b.submit(("alone", 1))

    result, after = _run_batcher(intake, scenario)
    assert result == after == "queued"
    assert waits == [_Batcher.GATHER_S]  # the short wave waited once, for GATHER_S; after a lone one, none
    assert [len(batch) for batch in intake.batches] == [8, 1, 1]


def test_a_failed_batch_answers_every_delivery_with_the_error():
    import asyncio

    intake = _RecordingIntake(fail=ConnectionError("database unreachable"))

    async def scenario(b):
        return await asyncio.gather(*(b.submit(("x", i)) for i in range(3)))

    results = _run_batcher(intake, scenario)
    assert len(results) == 3 and all(isinstance(r, ConnectionError) for r in results)


def test_a_caller_that_gives_up_does_not_stop_its_batch():
    import asyncio

    intake = _RecordingIntake()

    async def scenario(b):
        quitter = asyncio.ensure_future(b.submit(("quitter", 0)))
        stayer = asyncio.ensure_future(b.submit(("stayer", 0)))
        await asyncio.sleep(0)
        quitter.cancel()
        return await stayer

    assert _run_batcher(intake, scenario) == "queued"
    assert intake.batches == [[("quitter", 0), ("stayer", 0)]]  # written all the same
