"""The sans-IO frame decoder, fed bytes directly: no sockets."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from omkd.rpc.framing import NEED_DATA, FrameDecoder, FrameTooLarge, Framing, encode_frame

MESSAGES = [b'{"jsonrpc":"2.0","method":"daemon.ping","id":1}', b"[]", b"x" * 300, b""]


def drain(decoder: FrameDecoder) -> list[bytes]:
    out = []
    while (message := decoder.next_message()) is not NEED_DATA:
        assert isinstance(message, bytes)
        out.append(message)
    return out


def length_stream(messages: list[bytes]) -> bytes:
    return b"".join(encode_frame(Framing.LENGTH, m) for m in messages)


def test_whole_length_prefixed_message() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(length_stream(MESSAGES[:1]))
    assert decoder.framing is Framing.LENGTH
    assert drain(decoder) == MESSAGES[:1]
    assert decoder.pending == 0


@pytest.mark.parametrize("framing", [Framing.LENGTH, Framing.LINE])
def test_split_at_every_byte_offset(framing: Framing) -> None:
    messages = [m for m in MESSAGES if m.startswith(b"{")] * 3
    stream = b"".join(encode_frame(framing, m) for m in messages)
    for cut in range(1, len(stream)):
        decoder = FrameDecoder()
        decoder.receive_data(stream[:cut])
        got = drain(decoder)
        decoder.receive_data(stream[cut:])
        got += drain(decoder)
        assert got == messages, cut
        assert decoder.framing is framing


def test_byte_by_byte() -> None:
    decoder = FrameDecoder()
    got: list[bytes] = []
    for byte in length_stream(MESSAGES):
        decoder.receive_data(bytes([byte]))
        got += drain(decoder)
    assert got == MESSAGES


def test_many_messages_in_one_chunk() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(length_stream(MESSAGES * 50))
    assert drain(decoder) == MESSAGES * 50


def test_oversize_length_refused_before_buffering() -> None:
    decoder = FrameDecoder(max_message_bytes=100)
    decoder.receive_data(struct.pack(">I", 101))  # only the prefix has arrived
    with pytest.raises(FrameTooLarge) as info:
        decoder.next_message()
    assert (info.value.size, info.value.limit) == (101, 100)


def test_message_at_the_limit_is_accepted() -> None:
    decoder = FrameDecoder(max_message_bytes=100)
    decoder.receive_data(length_stream([b"a" * 100]))
    assert drain(decoder) == [b"a" * 100]


def test_huge_announced_length() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(b"\xff\xff\xff\xff")
    with pytest.raises(FrameTooLarge):
        decoder.next_message()


def test_line_mode_chosen_by_first_byte() -> None:
    for first in (b"{", b"["):
        decoder = FrameDecoder()
        decoder.receive_data(first + b'"a":1}\n')
        assert decoder.framing is Framing.LINE


def test_white_space_first_is_line_mode_when_no_length_could_begin_so() -> None:
    for first in (b"\n", b"\r\n", b" ", b"\t"):
        decoder = FrameDecoder()
        decoder.receive_data(first + b'{"a":1}\n')
        assert decoder.framing is Framing.LINE
        assert drain(decoder) == [b'{"a":1}']
    # A limit so high that "\n" might begin a length (of at least 160 MiB): length mode.
    decoder = FrameDecoder(max_message_bytes=0x0A_00_00_00)
    decoder.receive_data(b"\n")
    assert decoder.framing is Framing.LENGTH


def test_a_last_line_needs_no_newline_at_the_end_of_the_stream() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(b'{"a":1}\n{"b":2}')
    assert drain(decoder) == [b'{"a":1}']
    assert decoder.end_of_stream()
    assert drain(decoder) == [b'{"b":2}']
    assert not decoder.end_of_stream()  # nothing left
    length = FrameDecoder()
    length.receive_data(encode_frame(Framing.LENGTH, b"{}")[:-1])
    assert not length.end_of_stream() and drain(length) == []  # a cut frame stays cut


def test_an_oversize_length_that_reads_as_text_says_so() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(b"GET / HTTP/1.1\r\n")
    with pytest.raises(FrameTooLarge) as info:
        decoder.next_message()
    assert info.value.text == "GET "
    binary = FrameDecoder()
    binary.receive_data(b"\xff\xff\xff\xff")
    with pytest.raises(FrameTooLarge) as info:
        binary.next_message()
    assert info.value.text is None


def test_line_mode_messages_crlf_and_blank_lines() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(b'{"a":1}\r\n\n  \n[1,2]\n{"b"')
    assert drain(decoder) == [b'{"a":1}', b"[1,2]"]
    decoder.receive_data(b":2}\n")
    assert drain(decoder) == [b'{"b":2}']


def test_line_mode_oversize_line_without_newline() -> None:
    decoder = FrameDecoder(max_message_bytes=10)
    decoder.receive_data(b"{" + b"a" * 10)
    with pytest.raises(FrameTooLarge):
        decoder.next_message()


def test_line_mode_oversize_complete_line() -> None:
    decoder = FrameDecoder(max_message_bytes=10)
    decoder.receive_data(b"{" + b"a" * 20 + b"}\n")
    with pytest.raises(FrameTooLarge):
        decoder.next_message()


def test_encode_frame() -> None:
    assert encode_frame(Framing.LENGTH, b"abc") == b"\x00\x00\x00\x03abc"
    assert encode_frame(Framing.LINE, b"abc") == b"abc\n"


@given(st.lists(st.binary(max_size=200), max_size=20), st.data())
def test_length_mode_property(messages: list[bytes], data: st.DataObject) -> None:
    stream = length_stream(messages)
    if stream[:1] in (b"{", b"["):  # a first length byte of 0x7b/0x5b would mean 2 GB
        return
    decoder = FrameDecoder(max_message_bytes=1000)
    got: list[bytes] = []
    position = 0
    while position < len(stream):
        step = data.draw(st.integers(min_value=1, max_value=64))
        decoder.receive_data(stream[position : position + step])
        position += step
        got += drain(decoder)
    assert got == messages


@given(st.binary(max_size=2000))
def test_arbitrary_bytes_never_crash(blob: bytes) -> None:
    decoder = FrameDecoder(max_message_bytes=500)
    decoder.receive_data(blob)
    try:
        for message in drain(decoder):
            assert len(message) <= 500
    except FrameTooLarge as exc:
        assert exc.size > 500


def test_protocol_core_imports_without_trio() -> None:
    """The sans-IO core (framing, dispatch, method table, OpenRPC) needs no trio: a fresh
    interpreter that refuses to import trio can still load it and answer a message."""
    import subprocess
    import sys

    probe = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'trio' or name.startswith('trio.'):\n"
        "            raise ImportError('trio is blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import omkd.rpc.framing, omkd.rpc.dispatch, omkd.rpc.methods, omkd.rpc.openrpc\n"
        "from omkd.rpc.dispatch import Dispatcher\n"
        "class Session:\n"
        "    aborted = False\n"
        "    async def settle(self):\n"
        "        pass\n"
        'coro = Dispatcher().handle(b\'{"jsonrpc":"2.0","method":"nope","id":1}\', Session())\n'
        "try:\n"
        "    coro.send(None)\n"
        "except StopIteration as done:\n"
        "    print(done.value.decode())\n"
        "assert 'trio' not in sys.modules\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert '"code":-32601' in result.stdout


def test_has_message_matches_next_message() -> None:
    for framing in (Framing.LENGTH, Framing.LINE):
        stream = b"".join(encode_frame(framing, m) for m in [b'{"a":1}', b'{"b":2}'])
        for cut in range(len(stream) + 1):
            decoder = FrameDecoder()
            decoder.receive_data(stream[:cut])
            while decoder.has_message():
                assert decoder.next_message() is not NEED_DATA
            assert decoder.next_message() is NEED_DATA or framing is Framing.LINE
    oversize = FrameDecoder(max_message_bytes=10)
    oversize.receive_data(struct.pack(">I", 11))
    assert oversize.has_message()  # next_message raises rather than waiting
