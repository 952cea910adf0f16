"""Resume: replay what was missed, in order, then live, with no gap and no duplicate."""

from __future__ import annotations

from collections.abc import Callable

from core.llm import ChatMessage
from core.scripted_llm import scripted_reply
from tests.e2e.client import Client, assert_contiguous, joined_deltas, new_widget, sequenced
from tests.servers import GatewayProcess


async def test_disconnect_mid_answer_and_resume_on_a_new_socket(slow_gateway: GatewayProcess) -> None:
    """The resumed socket gets every event after last_seq, then live; the answer reassembles exactly."""
    widget = new_widget(slow_gateway)
    first = await Client.open(slow_gateway)
    welcome = await first.hello(widget)
    start = await first.ask_and_read("r-1", "resume me")
    last_seq = first.last_seq()
    first.ws.transport.abort()  # the network drops mid-answer: no close handshake

    second = await Client.open(slow_gateway)
    resumed = await second.hello(widget, resume={"epoch": welcome["epoch"], "last_seq": last_seq})
    assert resumed["resumed"] is True
    assert resumed["epoch"] == welcome["epoch"]
    rest = await second.until_ai_end()

    assert_contiguous(rest, last_seq + 1)
    end = rest[-1]
    assert end["status"] == "complete"
    everything = sequenced(first.frames) + sequenced(rest)
    assert_contiguous(everything, 1)
    assert joined_deltas(everything, start["response_id"]) == end["text"]
    assert end["text"] == "".join(scripted_reply([ChatMessage("user", "resume me")], 240))
    await second.close()


async def test_resume_with_nothing_missed_goes_live(gateway: GatewayProcess) -> None:
    """Resuming at the latest seq replays nothing; the next turn arrives live from seq+1."""
    widget = new_widget(gateway)
    first = await Client.open(gateway)
    welcome = await first.hello(widget)
    await first.send({"type": "message", "client_msg_id": "l-1", "text": "one"})
    frames = await first.until_ai_end()
    last_seq = frames[-1]["seq"]
    await first.close()

    second = await Client.open(gateway)
    resumed = await second.hello(widget, resume={"epoch": welcome["epoch"], "last_seq": last_seq})
    assert resumed["resumed"] is True
    assert resumed["seq"] == last_seq
    await second.send({"type": "message", "client_msg_id": "l-2", "text": "two"})
    later = await second.until_ai_end()
    assert_contiguous(later, last_seq + 1)
    await second.close()


async def test_stale_epoch_gets_reset(gateway: GatewayProcess) -> None:
    """A client holding seqs of another epoch is told to reset, never shown a gap."""
    widget = new_widget(gateway)
    client = await Client.open(gateway)
    welcome = await client.hello(widget, resume={"epoch": "not-this-one", "last_seq": 3})
    assert welcome["resumed"] is False
    reset = await client.recv()
    assert reset["type"] == "reset"
    assert reset["reason"] == "epoch_changed"
    assert reset["epoch"] == welcome["epoch"]
    assert reset["seq"] == welcome["seq"]
    # Live from the reset's seq.
    await client.send({"type": "message", "client_msg_id": "e-1", "text": "after reset"})
    frames = await client.until_ai_end()
    assert_contiguous(frames, reset["seq"] + 1)
    await client.close()


async def test_resume_beyond_the_replay_window_gets_reset(
    gateway_factory: Callable[..., GatewayProcess],
) -> None:
    """When the window no longer reaches last_seq, the client gets reset instead of a gap."""
    small = gateway_factory({"CHATGW_REPLAY_WINDOW": "4", "CHATGW_DELTA_FLUSH_MS": "0"})
    widget = new_widget(small)
    client = await Client.open(small)
    welcome = await client.hello(widget)
    await client.send({"type": "message", "client_msg_id": "w-1", "text": "fill the window"})
    frames = await client.until_ai_end()
    assert frames[-1]["seq"] > 6
    await client.close()

    again = await Client.open(small)
    resumed = await again.hello(widget, resume={"epoch": welcome["epoch"], "last_seq": 1})
    assert resumed["resumed"] is False
    reset = await again.recv()
    assert reset == {"type": "reset", "reason": "window", "epoch": welcome["epoch"], "seq": frames[-1]["seq"]}
    await again.close()


async def test_resume_ahead_of_the_stream_gets_reset(gateway: GatewayProcess) -> None:
    """A last_seq the stream never reached is answered with reset, not silence."""
    widget = new_widget(gateway)
    first = await Client.open(gateway)
    welcome = await first.hello(widget)
    await first.close()
    client = await Client.open(gateway)
    await client.hello(widget, resume={"epoch": welcome["epoch"], "last_seq": 99})
    reset = await client.recv()
    assert reset["type"] == "reset"
    assert reset["reason"] == "seq_ahead"
    await client.close()
