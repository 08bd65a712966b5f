"""The process model, as users run it: `python -m service` with front-end and model processes.

Real processes, real sockets, `kill -9`: totals across processes in one `/metrics`, one global queue
bound, deadlines dropping work in the model process, supervision (a dead model process fails exactly
its images and comes back; a dead front-end's slots are reclaimed and the others keep serving), and
the shared-memory ring's bookkeeping.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest

from bench.loadgen import Payload, multipart_request
from service.grpc.gen.inference import grpc_service_pb2 as ipb
from service.grpc.gen.inference import grpc_service_pb2_grpc as ipb_grpc
from service.grpc.gen.levit.v1 import classifier_pb2 as pb
from service.grpc.gen.levit.v1 import classifier_pb2_grpc as pb_grpc
from tests.conftest import photo, wait_until
from tests.helpers import metric, scrape
from tests.stress.procs import ServerProcess

CAT = photo("cat.jpg")


class Proc(ServerProcess):
    """`python -m service` in the default process model (tests/stress/procs.py starts it)."""

    def ready(self) -> bool:
        return httpx.get(self.url + "/readyz").status_code == 200

    def children(self) -> dict[str, int]:
        """OS name -> pid of this server's processes (front-ends and model instances name themselves)."""
        found = {}
        for pid in self.pids()[1:]:
            with contextlib.suppress(OSError), open(f"/proc/{pid}/comm") as comm:
                found[comm.read().strip()] = pid
        return found

    def classify(self, timeout_ms: int | None = None) -> httpx.Response:
        headers = {"X-Request-Timeout-Ms": str(timeout_ms)} if timeout_ms else {}
        return httpx.post(self.url + "/classify", files={"img": ("cat.jpg", CAT)}, headers=headers, timeout=120)

    def finish(self) -> tuple[int, str]:
        """SIGTERM; the exit status and the server's log."""
        return self.stop(), self.logs()


@pytest.fixture
def slow() -> Iterator[Proc]:
    """One slow model process (so work is reliably in flight), two front-ends."""
    server = Proc(
        LEVIT_WORKERS="2", LEVIT_INSTANCES="1", LEVIT_THREADS="1", LEVIT_MODEL="LeViT_384", LEVIT_MAX_BATCH_SIZE="2"
    )
    try:
        yield server
    finally:
        server.proc.kill()
        server.proc.wait()


def burst(server: Proc, count: int, timeout_ms: int | None = None) -> list[int | str]:
    def one() -> int | str:
        try:
            return server.classify(timeout_ms).status_code
        except httpx.TransportError as error:  # only a killed front-end's own connections may see this
            return type(error).__name__

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(lambda _: one(), range(count)))


def test_processes_serve_both_protocols_with_totals_in_one_metrics() -> None:
    server = Proc(LEVIT_WORKERS="2", LEVIT_INSTANCES="2", LEVIT_THREADS="1")  # the default policy: brief
    try:
        names = server.children()
        assert {"levit-front-0", "levit-front-1", "levit-model-0", "levit-model-1"} <= set(names), names
        info = httpx.get(server.url + "/v1/model").json()
        assert info["instances"] == {
            "kind": "process", "count": 2, "threads": 1, "workers": 2, "policy": "brief", "threads_by_batch": {},
            "spin_count": 10000, "split_batches": False,
        }  # fmt: skip
        with open(f"/proc/{names['levit-model-1']}/environ", "rb") as environ:  # brief: what libgomp reads at load
            assert b"GOMP_SPINCOUNT=10000" in environ.read().split(b"\0")
        before = metric(scrape(server.url), "levit_images_classified_total")
        statuses = burst(server, 24)  # 24 connections: the kernel hands them to both front-ends
        with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            reply = pb_grpc.ClassifierStub(channel).Classify(
                pb.ClassifyRequest(images=[pb.Image(filename="cat.jpg", data=CAT)], top_k=3), timeout=60
            )
        assert statuses == [200] * 24
        assert [p.label for p in reply.results[0].predictions] == [
            p["label"] for p in server.classify().json()["results"][0]["predictions"][:3]
        ]
        # Whichever front-end answers the scrape, it reports every process's images.
        for _ in range(4):
            assert metric(scrape(server.url), "levit_images_classified_total") - before == 24 + 1 + 1
    finally:
        code, err = server.finish()
    assert code == 0, err


def test_front_ends_decode_rank_and_answer_without_torch() -> None:
    """Front-ends handle crops, raw inputs and probabilities in numpy: torch (about 150 MB of memory and most of
    a second to import per process) stays in the model processes. Every protocol's path runs first."""
    server = Proc()
    try:
        assert server.classify().status_code == 200
        with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            reply = pb_grpc.ClassifierStub(channel).Classify(
                pb.ClassifyRequest(images=[pb.Image(filename="cat.jpg", data=CAT)], top_k=3), timeout=60
            )
        assert len(reply.results[0].predictions) == 3
        pixels = {"name": "pixels", "datatype": "FP32", "shape": [1, 3, 224, 224], "data": [0.5] * (3 * 224 * 224)}
        wanted = [{"name": "probabilities", "parameters": {"classification": 2}}]
        v2 = httpx.post(server.url + "/v2/models/levit/infer", json={"inputs": [pixels], "outputs": wanted}, timeout=60)
        assert v2.status_code == 200, v2.text
        assert len(v2.json()["outputs"][0]["data"]) == 2
        with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:  # v2 over gRPC: its own module
            request = ipb.ModelInferRequest(model_name="levit")
            request.inputs.add(name="image", datatype="BYTES", shape=[1]).contents.bytes_contents.append(CAT)
            request.outputs.add(name="probabilities")
            infer = ipb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
        assert len(infer.raw_output_contents[0]) == 4 * 1000  # FP32 probabilities
        names = server.children()
        workers = httpx.get(server.url + "/v1/model").json()["instances"]["workers"]

        def maps(name: str) -> str:
            with open(f"/proc/{names[name]}/maps") as f:
                return f.read()

        assert "libtorch_cpu" in maps("levit-model-0")  # the check sees torch where it is loaded
        fronts = [name for name in names if name.startswith("levit-front")]
        assert len(fronts) == workers  # every front-end named (and so found), none skipped
        assert not [name for name in fronts if "libtorch" in maps(name)]
    finally:
        code, err = server.finish()
    assert code == 0, err


def test_sleep_policy_times_threads_per_bucket_with_sleeping_openmp_threads() -> None:
    """LEVIT_THREAD_POLICY=sleep: the model process runs with OMP_WAIT_POLICY=PASSIVE and reports, per batch
    size it compiled or warmed, the thread count (1 or LEVIT_THREADS) that was faster when timed at start."""
    server = Proc(LEVIT_THREAD_POLICY="sleep", LEVIT_INSTANCES="1", LEVIT_THREADS="2", LEVIT_MAX_BATCH_SIZE="4")
    try:
        instances = httpx.get(server.url + "/v1/model").json()["instances"]
        assert instances["policy"] == "sleep", instances
        assert instances["spin_count"] == 0, instances
        assert set(instances["threads_by_batch"]) == {"1", "4"}, instances  # eager engine: sizes 1 and max
        assert set(instances["threads_by_batch"].values()) <= {1, 2}
        with open(f"/proc/{server.children()['levit-model-0']}/environ", "rb") as environ:
            assert b"OMP_WAIT_POLICY=PASSIVE" in environ.read().split(b"\0")
        assert server.classify().status_code == 200
    finally:
        code, err = server.finish()
    assert code == 0, err


def test_queue_bound_is_global_and_refuses_at_once() -> None:
    server = Proc(
        LEVIT_WORKERS="2",
        LEVIT_INSTANCES="1",
        LEVIT_THREADS="1",
        LEVIT_MODEL="LeViT_384",
        LEVIT_MAX_BATCH_SIZE="1",
        LEVIT_MAX_QUEUE="4",
        LEVIT_THREAD_POLICY="spin",
    )
    try:
        instances = httpx.get(server.url + "/v1/model").json()["instances"]
        assert instances["policy"] == "spin" and instances["spin_count"] == 0, instances  # OpenMP's own spinning
        with open(f"/proc/{server.children()['levit-model-0']}/environ", "rb") as environ:
            assert not any(v.startswith(b"GOMP_SPINCOUNT=") for v in environ.read().split(b"\0"))
        statuses = burst(server, 24)
        assert set(statuses) <= {200, 503}, statuses
        assert statuses.count(503) >= 24 - 4 - 2 - 1 - 4, statuses  # queue + running + in transit, both front-ends
        assert statuses.count(200) >= 1
        samples = scrape(server.url)
        assert metric(samples, "levit_rejections_total", reason="queue_full") == statuses.count(503)
    finally:
        server.finish()


def test_a_request_still_uploading_holds_its_place_in_the_queue() -> None:
    """Admission counts a request from its headers on: while one upload is unfinished, a bound of one image
    is full, and the next request gets its 503 at once instead of being read and refused afterwards."""
    server = Proc(LEVIT_MAX_QUEUE="1")
    request = multipart_request("127.0.0.1", server.http_port, Payload("cat.jpg", CAT))
    try:
        with socket.create_connection(("127.0.0.1", server.http_port), timeout=60) as upload:
            upload.sendall(request[: len(request) // 2])  # headers and half of the body: admitted, still reading
            refusals = []
            for _ in range(50):  # until the front-end has read the headers (the probes themselves fit the bound)
                response = server.classify()
                if response.status_code == 503:
                    refusals.append(response.json()["error"])
                    break
            assert refusals == [{"code": "queue_full", "message": "queue full (1 of 1 images queued, decoding or "
                                 "uploading)"}], refusals  # fmt: skip
            upload.sendall(request[len(request) // 2 :])
            reply = upload.makefile("rb").readline()
            assert reply.startswith(b"HTTP/1.1 200"), reply  # the admitted upload is served
        assert server.classify().status_code == 200  # and its place given back
    finally:
        server.finish()


def test_deadline_drops_images_before_compute_in_the_model_process(slow: Proc) -> None:
    before = metric(scrape(slow.url), "levit_images_dropped_total", reason="deadline")
    statuses = burst(slow, 12, timeout_ms=150)  # LeViT_384 on one thread: ~0.1 s per image, 2 per batch
    assert 504 in statuses and set(statuses) <= {200, 504}, statuses
    wait_until(lambda: metric(scrape(slow.url), "levit_images_dropped_total", reason="deadline") > before)
    assert slow.classify().status_code == 200  # nothing stuck behind them


def test_killed_model_process_fails_its_images_and_comes_back(slow: Proc) -> None:
    model = slow.children()["levit-model-0"]
    with ThreadPoolExecutor(12) as pool:
        futures = [pool.submit(slow.classify) for _ in range(12)]
        wait_until(lambda: metric(scrape(slow.url), "levit_queue_depth") >= 4)  # work queued and in compute
        os.kill(model, signal.SIGKILL)
        wait_until(lambda: not slow.ready())  # the only instance is gone: not ready
        replies = [f.result() for f in futures]  # every request answered: none hangs
    statuses = [r.status_code for r in replies]
    assert set(statuses) <= {200, 500}, statuses
    failed = [r.json()["error"] for r in replies if r.status_code == 500]
    assert failed and all(e["code"] == "model_error" and "model process exited" in e["message"] for e in failed)
    assert len(failed) <= 2  # exactly the images it had taken (max batch 2); the queued ones were served later
    wait_until(slow.ready, timeout=180)
    assert slow.children()["levit-model-0"] != model
    assert slow.classify().status_code == 200


def test_killed_front_end_is_replaced_and_its_slots_reclaimed(slow: Proc) -> None:
    front = slow.children()["levit-front-0"]
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(burst, slow, 1) for _ in range(8)]
        wait_until(lambda: metric(scrape(slow.url), "levit_queue_depth") >= 2)
        os.kill(front, signal.SIGKILL)
        outcomes = [f.result()[0] for f in futures]
    assert set(outcomes) <= {200, "RemoteProtocolError", "ReadError"}, outcomes  # the dead one's own clients
    assert 200 in outcomes  # the other front-end kept serving
    wait_until(lambda: slow.children().get("levit-front-0", front) != front)
    wait_until(lambda: "reclaimed" in slow.logs())  # the replacement took over its predecessor's slots...
    assert burst(slow, 16) == [200] * 16  # ...so the whole queue is usable again, on both
    code, err = slow.finish()
    assert code == 0, err


def test_a_stop_while_a_front_end_restarts_is_a_clean_exit() -> None:
    """The supervisor's SIGTERM can reach a replacement front-end before it has a drain handler (it is still
    importing), which the signal then kills: that is not a failure (it reported exit status 241)."""
    server = Proc(LEVIT_WORKERS="2", LEVIT_INSTANCES="1", LEVIT_THREADS="1", LEVIT_LOG_LEVEL="INFO")
    before = set(server.pids())
    os.kill(server.children()["levit-front-0"], signal.SIGKILL)
    wait_until(lambda: set(server.pids()) - before)  # the replacement exists, still starting
    code, err = server.finish()
    assert code == 0, err
    assert "front-end 0 was stopped before it served" in err, err


def test_a_pair_splits_batches_and_keeps_serving_when_either_process_dies() -> None:
    """LEVIT_SPLIT_BATCHES (the default on 2-3 cores): the lead hands half of each batch to the idle follower;
    a killed follower fails only its half and comes back; a killed lead leaves the follower reading the queue."""
    server = Proc(
        LEVIT_SPLIT_BATCHES="on",
        LEVIT_THREADS="2",
        LEVIT_MODEL="LeViT_384",
        LEVIT_MAX_BATCH_SIZE="8",
        LEVIT_LOG_LEVEL="INFO",
    )

    def started(index: int) -> int:  # how many times model process `index` has come up
        return server.logs().count(f"model instance {index} ready")

    try:
        wait_until(lambda: started(0) == started(1) == 1, timeout=180)
        assert server.logs().count("linears: ") == 1  # timed once, by the lead; the follower took its pick
        info = httpx.get(server.url + "/v1/model").json()["instances"]
        assert (info["count"], info["threads"], info["split_batches"]) == (2, 2, True)
        before = scrape(server.url)
        files = [("img", (f"cat{i}.jpg", CAT)) for i in range(8)]
        reply = httpx.post(server.url + "/classify", files=files, timeout=120)
        assert reply.status_code == 200
        results = [r["predictions"] for r in reply.json()["results"]]
        assert len(results) == 8 and all(r == results[0] for r in results)  # both halves: the same answers
        after = scrape(server.url)
        calls = metric(after, "levit_batch_size_count") - metric(before, "levit_batch_size_count")
        images = metric(after, "levit_batch_size_sum") - metric(before, "levit_batch_size_sum")
        assert (calls, images) == (2, 8)  # one batch of 8, computed as two halves of 4

        for index in (1, 0):  # the follower, then the lead
            victim = server.children()[f"levit-model-{index}"]
            with ThreadPoolExecutor(12) as pool:
                futures = [pool.submit(server.classify) for _ in range(12)]
                wait_until(lambda: metric(scrape(server.url), "levit_queue_depth") >= 2)
                os.kill(victim, signal.SIGKILL)
                statuses = [f.result().status_code for f in futures]  # every request answered: none hangs
                assert server.ready()  # the other process still serves
            assert set(statuses) <= {200, 500} and 200 in statuses, (index, statuses)
            wait_until(lambda index=index: started(index) == 2, timeout=180)  # restarted
            assert burst(server, 6) == [200] * 6
    finally:
        code, err = server.finish()
    assert code == 0, err


def test_a_burst_of_stop_signals_still_stops_the_server_cleanly() -> None:
    """Signals that arrive while the stop handler runs (`timeout` or an init forwarding one while an operator
    sends another, a double Ctrl-C) must not wedge the supervisor: it drains and exits 0. Its handler once took
    a lock that a second signal, run inside the first, waited on forever."""
    server = Proc(LEVIT_WORKERS="1", LEVIT_INSTANCES="1", LEVIT_LOG_LEVEL="INFO")
    try:
        assert server.classify().status_code == 200
        pid, end, sent = server.proc.pid, time.monotonic() + 3, 0
        while time.monotonic() < end and server.proc.poll() is None:  # for 3 s, every 0-40 us
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGINT if sent % 2 else signal.SIGTERM)
            sent += 1
            pause = time.perf_counter() + random.random() * 4e-5
            while time.perf_counter() < pause:
                pass
        assert server.proc.wait(timeout=120) == 0, server.logs()
    finally:
        server.proc.kill()
        server.proc.wait()
    assert "stopped" in server.logs()


def test_a_killed_supervisors_metrics_folder_is_removed_by_the_next_start(tmp_path) -> None:
    """`kill -9` leaves the supervisor's metrics folder in the temp dir (no cleanup runs); the next supervisor to
    start there removes it, and never the folder of one still running."""
    env = {"TMPDIR": str(tmp_path), "LEVIT_WORKERS": "1", "LEVIT_INSTANCES": "1"}

    def folders() -> set[str]:
        return {path.name for path in tmp_path.glob("levit-metrics-*")}

    def alive(pid: int) -> bool:  # a zombie (an orphan nobody reaps yet) holds no lock
        try:
            with open(f"/proc/{pid}/stat") as stat:
                return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    servers: list[Proc] = []
    try:
        servers.append(killed := Proc(**env))
        (killed_folder,) = folders()
        servers.append(running := Proc(**env))
        (running_folder,) = folders() - {killed_folder}
        children = killed.pids()[1:]
        killed.proc.kill()
        killed.proc.wait()
        wait_until(lambda: not any(alive(pid) for pid in children))  # they die (the front-end drains) with it
        assert folders() == {killed_folder, running_folder}  # nothing cleans up after a SIGKILL
        servers.append(third := Proc(**env))
        assert killed_folder not in folders() and running_folder in folders() and len(folders()) == 2
        assert third.classify().status_code == 200 and running.classify().status_code == 200
        codes = [server.finish()[0] for server in (third, running)]
    finally:
        for server in servers:
            server.proc.kill()
            server.proc.wait()
    assert codes == [0, 0]
    assert folders() == set()  # a clean stop removes its own


def test_start_up_failure_in_a_model_process_stops_the_server_with_one_line(tmp_path) -> None:
    bad = tmp_path / "junk.pth"
    bad.write_bytes(b"not a checkpoint")
    server = Proc(wait=False, LEVIT_WEIGHTS=str(bad), LEVIT_WORKERS="2", LEVIT_INSTANCES="2")
    assert server.proc.wait(timeout=180) == 1, server.logs()
    err = server.logs()
    assert "Traceback" not in err
    [line] = [ln for ln in err.splitlines() if "cannot start" in ln]  # two instances failed: one line
    assert "not a readable" in line
