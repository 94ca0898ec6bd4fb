"""The event loop (wqs/loop/reactor.py): readiness, timers, turn order, other threads."""

from __future__ import annotations

import os
import socket
import threading
import time

from wqs.loop.reactor import Reactor


def test_a_turn_runs_ready_handlers_then_timers_then_callbacks_then_hooks():
    loop = Reactor()
    order = []
    a, b = socket.socketpair()
    loop.add_reader(a.fileno(), lambda: (order.append("read"), a.recv(10)))
    loop.call_later(0, lambda: order.append("timer"))
    loop.call_soon(lambda: order.append("soon"))
    loop.on_turn_end(lambda: order.append("end"))
    b.send(b"x")
    time.sleep(0.01)
    loop.run_once(0)
    assert order == ["read", "timer", "soon", "end"]
    a.close(), b.close(), loop.close()


def test_a_callback_queued_by_a_callback_waits_for_the_next_turn():
    loop = Reactor()
    seen = []
    loop.call_soon(lambda: (seen.append(1), loop.call_soon(lambda: seen.append(2))))
    loop.run_once(0)
    assert seen == [1]
    loop.run_once(0)
    assert seen == [1, 2]
    loop.close()


def test_writers_and_readers_on_one_fd_and_forget():
    loop = Reactor()
    a, b = socket.socketpair()
    events = []
    loop.add_writer(a.fileno(), lambda: events.append("w"))
    loop.run_once(0)
    assert events == ["w"]  # a socket with room is writable
    loop.add_reader(a.fileno(), lambda: events.append("r"))
    b.send(b"x")
    time.sleep(0.01)
    loop.run_once(0)
    assert events[1:] == ["r", "w"]
    loop.remove_writer(a.fileno())
    loop.forget(a.fileno())
    events.clear()
    loop.run_once(0)
    assert events == []
    a.close(), b.close(), loop.close()


def test_timers_fire_in_order_and_cancel():
    loop = Reactor()
    fired = []
    loop.call_later(0.03, lambda: fired.append("late"))
    loop.call_later(0.01, lambda: fired.append("early"))
    dropped = loop.call_later(0.02, lambda: fired.append("cancelled"))
    dropped.cancel()
    assert loop.run_until(lambda: len(fired) == 2, timeout_s=2)
    assert fired == ["early", "late"]
    loop.close()


def test_another_thread_wakes_the_loop_at_once():
    loop = Reactor()
    got = []
    threading.Timer(0.05, lambda: loop.call_soon_threadsafe(got.append, "hi")).start()
    started = time.monotonic()
    assert loop.run_until(lambda: bool(got), timeout_s=5)
    assert time.monotonic() - started < 0.5  # not after the loop's longest wait (1 s)
    loop.close()


def test_a_failing_handler_is_logged_and_the_loop_goes_on(caplog):
    loop = Reactor()
    seen = []
    loop.call_soon(lambda: 1 / 0)
    loop.call_soon(lambda: seen.append("after"))
    loop.run_once(0)
    assert seen == ["after"] and "ZeroDivisionError" in caplog.text
    loop.close()


def test_run_until_submits_what_was_queued_before_it_waits():
    """Work started outside a turn (the engine facade's calls) reaches the turn-end hooks
    before the loop sleeps: a first turn does not wait."""
    loop = Reactor()
    r, w = os.pipe()
    submitted = []
    loop.on_turn_end(lambda: submitted.append(True))
    started = time.monotonic()
    assert not loop.run_until(lambda: False, timeout_s=0.05)
    assert submitted and time.monotonic() - started < 0.5
    os.close(r), os.close(w), loop.close()


def test_stop_from_another_thread_ends_run():
    loop = Reactor()
    t = threading.Thread(target=loop.run)
    t.start()
    time.sleep(0.05)
    loop.stop()
    t.join(2)
    assert not t.is_alive()
    loop.close()
