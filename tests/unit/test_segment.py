"""A segment found at its full size but never reserved (its creator SIGKILLed between
the resize and the fallocate) is reserved by the next process that creates it, so a
full /dev/shm can never turn into a SIGBUS later."""

from __future__ import annotations

import os
import uuid

import posix_ipc

from hybrid_layer.shm.segment import Segment

SIZE = 4 * 1024 * 1024


def test_an_unreserved_segment_of_the_right_size_is_reserved_on_create() -> None:
    name = f"/hl.t{uuid.uuid4().hex[:10]}.unreserved"
    shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, 0o600)
    try:
        os.ftruncate(shm.fd, SIZE)  # what a killed creator leaves: sized, not reserved
        assert os.fstat(shm.fd).st_blocks * 512 < SIZE
        seg = Segment(name, SIZE, 0o600, create=True)
        try:
            assert not seg.created
            assert os.fstat(shm.fd).st_blocks * 512 >= SIZE
        finally:
            seg.close()
    finally:
        shm.close_fd()
        posix_ipc.unlink_shared_memory(name)
