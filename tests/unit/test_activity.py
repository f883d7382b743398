"""The run's activity board (sft_ray/activity.py) as a plain object: what the driver reads from it."""

from __future__ import annotations

from sft_ray.activity import Board


def test_a_progress_reply_the_driver_never_got_loses_no_line():
    """The driver asks with a timeout (2 s); on a loaded machine it can stop waiting for a reply the
    board did send. The lines in that reply come again: the driver says how many it has received.
    (Before: the board handed its lines over once, so a reply lost to the timeout lost them; seen
    under load as a first-use "Downloading ..." line that never reached the driver.)"""
    board = Board()
    board.report("actor-1", {"at": 0.0, "finished": 3, "model_calls": 2, "messages": ["Downloading x...", "done"]})
    assert board.progress() == (3, 2, ["Downloading x...", "done"])
    assert board.progress() == (3, 2, ["Downloading x...", "done"])  # that reply was lost: asked again from 0
    board.report("actor-1", {"at": 1.0, "finished": 4, "model_calls": 0, "messages": ["later"]})
    assert board.progress(2) == (4, 0, ["later"])  # the driver got the first two
    assert board.progress(3) == (4, 0, [])
    assert board.messages == []  # what the driver has received is not kept
