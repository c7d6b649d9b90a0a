"""ByteQueue: the same bytes out as a plain buffer would give, however they were fed."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from protocols._buffers import ByteQueue, LineBuffer

operations = st.lists(
    st.tuples(st.sampled_from(["take", "take_up_to", "peek", "find", "feed"]), st.integers(0, 40)),
    max_size=30,
)


@given(st.lists(st.binary(max_size=30), max_size=8), operations)
def test_behaves_as_one_contiguous_buffer(
    chunks: list[bytes], steps: list[tuple[str, int]]
) -> None:
    queue, model = ByteQueue(), bytearray()
    for chunk in chunks:
        queue.feed(chunk)
        model += chunk
    for operation, count in steps:
        match operation:
            case "take":
                assert queue.take(count) == model[:count]
                del model[:count]
            case "take_up_to":
                piece = queue.take_up_to(count)
                assert bool(piece) == bool(model and count)
                assert piece == model[: len(piece)] and len(piece) <= count
                del model[: len(piece)]
            case "peek":
                assert queue.peek(count) == model[:count]
            case "find":
                assert queue.find(b"\n", count) == model.find(b"\n", 0, count)
                assert queue.find(b"\n") == model.find(b"\n")
            case "feed":
                queue.feed(b"x\n" * (count % 5))
                model += b"x\n" * (count % 5)
        assert len(queue) == len(model)
    assert queue.take_all() == model
    assert len(queue) == 0


def test_a_whole_chunk_is_handed_on_uncopied() -> None:
    """A literal's bulk leaves the main process in the objects it came in."""
    first, second = b"a" * 70_000, b"b" * 70_000
    queue = ByteQueue()
    queue.feed(first)
    queue.feed(second)
    assert queue.take_up_to(1_000_000) is first
    assert queue.take_up_to(1_000_000) is second


def test_lines_cut_from_one_chunk_leave_the_rest_in_place() -> None:
    buffer = LineBuffer(limit=100)
    buffer.feed(b"one\r\ntwo\r\nthr")
    buffer.feed(b"ee\r\n" + b"x" * 10)
    assert [buffer.pop_line(), buffer.pop_line(), buffer.pop_line()] == [
        b"one\r\n",
        b"two\r\n",
        b"three\r\n",
    ]
    assert buffer.pop_line() is None
    assert buffer.pop_all() == b"x" * 10
