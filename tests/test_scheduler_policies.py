"""The scheduler's policies as a state machine, on a decoder with no model (tests/fake_decoder.py):
admission under the row and token caps, round-robin between requests, halving a failed prefill,
eviction on out-of-memory, cancellation and shutdown. Each runs in well under a second."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from PIL import Image

from service.engine import Cancelled, OcrOptions
from service.engine.device import DeviceLost
from service.errors import DeviceFailed, NotReady, OutOfMemory
from service.failures import to_service_error
from service.inputs import Document
from service.scheduler import PageRequest, Scheduler
from service.scheduler.queue import PageQueue
from tests.fake_decoder import PROMPT_TOKENS, FakeEngine
from tests.helpers import started_scheduler

PAGE = Image.new("RGB", (64, 64), "white")


def pages(n_pages: int, tokens: int, *, timeout: float = 30.0) -> PageRequest:
    """A request of ``n_pages`` pages that generate ``tokens`` tokens each."""
    document = Document(list(range(1, n_pages + 1)), _images=[PAGE] * n_pages)
    return PageRequest(document, OcrOptions(mode="tiny", max_new_tokens=tokens), deadline=time.monotonic() + timeout)


@contextmanager
def running(engine: FakeEngine, requests: list[PageRequest], on_fatal=None, **config) -> Iterator[Scheduler]:
    """A ready scheduler over ``engine`` that has been handed ``requests`` (all at once: the idle batch
    waits for as many pages as it has room for); stopped when the block ends."""
    room = sum(r.pages for r in requests)
    config = {"max_batch_size": room, "batch_wait_ms": 2000, "max_batch_tokens": 10**9, **config}
    scheduler = started_scheduler(engine, on_fatal, **config)
    try:
        for request in requests:
            scheduler.submit(request)
        yield scheduler
    finally:
        scheduler.stop()


def results(requests: list[PageRequest]) -> list:
    return [r.future.result(timeout=10) for r in requests]


def test_no_step_runs_more_pages_than_the_row_cap():
    engine = FakeEngine()
    requests = [pages(1, tokens) for tokens in (3, 5, 7, 9, 11)]
    with running(engine, requests, max_batch_size=2):
        assert results(requests) == [[list(range(1, t + 1))] for t in (3, 5, 7, 9, 11)]
        assert max(engine.trace.steps) == 2


def test_pages_join_only_while_the_kv_footprint_fits_the_token_budget():
    engine = FakeEngine()
    requests = [pages(1, 20) for _ in range(6)]
    budget = 2 * (PROMPT_TOKENS + 20)  # two rows at their longest, padding included
    with running(engine, requests, max_batch_tokens=budget):
        results(requests)
        assert max(engine.trace.steps) == 2 and max(engine.trace.joins) <= 2


def test_a_page_larger_than_the_budget_still_runs_alone():
    engine = FakeEngine()
    request = pages(1, 4)
    with running(engine, [request], max_batch_tokens=PROMPT_TOKENS // 2):
        assert results([request]) == [[[1, 2, 3, 4]]]


def test_pages_are_admitted_round_robin_between_requests():
    engine = FakeEngine()
    long_pdf, image = pages(4, 3), pages(1, 5)  # told apart by their lengths
    with running(engine, [long_pdf, image], max_batch_size=1, batch_wait_ms=0):
        results([long_pdf, image])
        assert engine.trace.prepared[:3] == [3, 5, 3]  # the image waits for one page, not four


def test_interactive_pages_go_before_job_pages_and_clients_take_turns():
    queue = PageQueue(capacity=100)
    job = pages(5, 1)
    job.priority, job.client = "batch", "owner:a"
    busy = [pages(2, 1) for _ in range(3)]  # one client's three requests
    for request in busy:
        request.client = "address:10.0.0.1"
    other = pages(2, 1)
    other.client = "address:10.0.0.2"
    for request in (job, *busy, other):
        queue.put(request, retry_after_s=1)
    order = [queue.take() for _ in range(11)]
    names = {id(job): "job", id(busy[0]): "b0", id(busy[1]): "b1", id(busy[2]): "b2", id(other): "other"}
    assert [names[id(request)] for request, _ in order] == [
        "b0",
        "other",
        "b1",
        "other",
        "b2",
        "b0",
        "b1",
        "b2",  # clients alternate, then the busy one's requests
        "job",
        "job",
        "job",  # the job's pages only when no interactive page waits
    ]
    assert queue.take(batch=False) is None and queue.pages == 2  # job pages held back when asked


def test_job_pages_leave_rows_to_interactive_pages():
    engine = FakeEngine()
    job = pages(12, 400, timeout=60)
    job.priority = "batch"
    with running(engine, [job], max_batch_size=8, batch_wait_ms=0) as scheduler:
        wait_until_running = time.monotonic() + 10
        while scheduler.running_pages < 7 and time.monotonic() < wait_until_running:
            time.sleep(0.005)
        assert scheduler.reserved_rows == 1 and scheduler.running_pages == 7  # one row left to interactive pages
        interactive = pages(1, 3)
        scheduler.submit(interactive)
        assert results([interactive]) == [[[1, 2, 3]]]
        assert not job.future.done()  # answered while the job's pages were still decoding
        job.cancel.set()


def test_job_pages_are_prepared_once_no_interactive_page_decodes_whole_and_one_at_a_time():
    engine = FakeEngine(step_s=0.002)
    interactive = pages(1, 300)
    with running(engine, [interactive], max_batch_size=4, batch_wait_ms=0) as scheduler:
        while not engine.trace.steps:
            time.sleep(0.001)
        prepared_when_done: list[int] = []
        interactive.future.add_done_callback(lambda _: prepared_when_done.append(len(engine.trace.prepared)))
        calls: list[int] = []
        prepare = engine.prepare
        engine.prepare = lambda tasks: (calls.append(len(tasks)), prepare(tasks))[1]
        job = pages(3, 3)
        job.priority = "batch"
        scheduler.submit(job)
        assert results([interactive, job]) == [[list(range(1, 301))], [[1, 2, 3]] * 3]
    assert prepared_when_done == [1]  # the job pages' model work waited for the interactive page to finish
    assert calls == [1, 1, 1]  # then whole, not piece by piece (no reader waits), one job page an engine call


def test_a_failed_prefill_is_retried_in_halves_and_every_page_finishes():
    engine = FakeEngine(join_limit=2)
    requests = [pages(1, 4) for _ in range(5)]
    with running(engine, requests):
        assert results(requests) == [[[1, 2, 3, 4]]] * 5
        assert engine.trace.joins[:2] == [5, 2]  # 5 failed, then half of it


def test_a_step_out_of_memory_evicts_the_newest_half_which_goes_on_from_its_tokens():
    engine = FakeEngine(step_limit=2)
    requests = [pages(1, 6) for _ in range(4)]
    with running(engine, requests):
        assert results(requests) == [[[1, 2, 3, 4, 5, 6]]] * 4
        first_failure = engine.trace.steps.index(4)
        assert max(engine.trace.steps[first_failure + 1 :]) <= 2  # the row cap holds after the eviction
    announced = engine.trace.tokens
    assert len(announced) == len(set(announced)) == 4 * 6  # no token generated (or streamed) twice


def test_a_page_out_of_memory_alone_fails_its_request_and_no_other():
    engine = FakeEngine(poison=13)
    poisoned, others = pages(1, 13), [pages(1, 5) for _ in range(3)]
    with running(engine, [others[0], poisoned, *others[1:]]) as scheduler:
        with pytest.raises(torch.OutOfMemoryError):
            poisoned.future.result(timeout=10)
        assert results(others) == [[[1, 2, 3, 4, 5]]] * 3
        assert scheduler.state == "ready"


def test_a_cancelled_request_leaves_the_batch_and_the_others_finish():
    engine = FakeEngine(step_s=0.001)
    endless, short = pages(1, 8192), pages(1, 50)
    with running(engine, [endless, short]) as scheduler:
        assert results([short]) == [[list(range(1, 51))]]
        endless.cancel.set()
        with pytest.raises(Cancelled):
            endless.future.result(timeout=10)
        deadline = time.monotonic() + 120  # liveness on a busy machine, not a speed claim
        while scheduler.running_pages:
            assert time.monotonic() < deadline
            time.sleep(0.01)


def test_a_failure_in_preparing_fails_only_the_pages_it_was_preparing():
    engine = FakeEngine()
    engine.fail_prepare = RuntimeError("vision encoder failed (injected)")
    first = pages(1, 3)
    with running(engine, [first]) as scheduler:
        with pytest.raises(RuntimeError, match="injected"):
            first.future.result(timeout=10)
        engine.fail_prepare = None
        second = pages(1, 3)
        scheduler.submit(second)
        assert results([second]) == [[[1, 2, 3]]]


def test_shutdown_refuses_waiting_pages_at_once_and_ends_running_ones_after_the_grace():
    engine = FakeEngine(step_s=0.001)
    decoding, waiting = pages(1, 8192), pages(1, 3)
    with running(engine, [decoding], max_batch_size=1) as scheduler:
        while not engine.trace.steps:
            time.sleep(0.005)
        scheduler.submit(waiting)
        scheduler.begin_shutdown(grace_s=0.2)
        with pytest.raises(NotReady):
            waiting.future.result(timeout=1)
        assert not decoding.future.done()  # still decoding within its grace
        with pytest.raises(NotReady, match="grace period"):
            decoding.future.result(timeout=5)


def test_an_allocation_failure_of_any_library_counts_as_out_of_memory():
    engine = FakeEngine(poison=13)
    cublas = "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"
    engine.out_of_memory = lambda message: RuntimeError(cublas)
    poisoned, others = pages(1, 13), [pages(1, 5) for _ in range(3)]
    with running(engine, [others[0], poisoned, *others[1:]]) as scheduler:
        with pytest.raises(RuntimeError) as failed:
            poisoned.future.result(timeout=10)
        assert results(others) == [[[1, 2, 3, 4, 5]]] * 3  # evicted and retried, as after torch's own OOM
        assert scheduler.state == "ready"
    answer = to_service_error(failed.value, retry_after_s=2)
    assert isinstance(answer, OutOfMemory) and answer.headers["Retry-After"] == "2"


@pytest.mark.parametrize(
    "error",
    [
        "CUDA error: an illegal memory access was encountered",
        "CUDA error: device-side assert triggered",
        "CUDA error: unspecified launch failure",
    ],
)
def test_a_sticky_device_error_fails_every_page_reports_failed_and_asks_for_a_restart(error):
    engine = FakeEngine(step_s=0.001)
    decoding, waiting = pages(1, 8192), pages(2, 3)
    fatal: list[BaseException] = []
    with running(engine, [decoding], on_fatal=fatal.append, max_batch_size=1) as scheduler:
        while not engine.trace.steps:
            time.sleep(0.005)
        scheduler.submit(waiting)
        engine.fail_step = torch.AcceleratorError(error)
        for request in (decoding, waiting):
            with pytest.raises(DeviceLost):
                request.future.result(timeout=5)
        assert scheduler.state == "failed" and error in scheduler.error
        assert len(fatal) == 1 and isinstance(fatal[0], DeviceLost)
        with pytest.raises(NotReady):
            scheduler.submit(pages(1, 3))
    answer = to_service_error(fatal[0], retry_after_s=2)
    assert isinstance(answer, DeviceFailed) and answer.status == 503 and answer.headers["Retry-After"] == "2"


def test_a_sticky_device_error_while_preparing_pages_answers_them_and_stops():
    engine = FakeEngine()
    engine.fail_prepare = torch.AcceleratorError("CUDA error: device-side assert triggered")
    fatal: list[BaseException] = []
    request = pages(1, 3)
    with running(engine, [request], on_fatal=fatal.append) as scheduler:
        with pytest.raises(torch.AcceleratorError):
            request.future.result(timeout=5)
        deadline = time.monotonic() + 120  # liveness on a busy machine, not a speed claim
        while scheduler.state != "failed":
            assert time.monotonic() < deadline
            time.sleep(0.01)
    assert isinstance(to_service_error(request.future.exception(), retry_after_s=2), DeviceFailed)
    assert len(fatal) == 1


def test_retry_after_is_estimated_from_the_queue_and_how_fast_pages_finish():
    engine = FakeEngine(step_s=0.005)
    backlog = pages(300, 4)
    with running(engine, [backlog], max_batch_size=1, batch_wait_ms=0, queue_size=400) as scheduler:
        assert scheduler.retry_after_s() == 2  # nothing finished yet: the configured value
        while len(backlog.results) < 20:
            time.sleep(0.01)
        estimate, waiting = scheduler.retry_after_s(), scheduler.queued_pages
        backlog.cancel.set()
    assert waiting > 200 and estimate > 2  # hundreds of pages wait: more than the constant 2 s
    assert estimate <= 600
