"""Pure description of every shared-memory object of a host namespace: names, offsets, formats.

A *namespace* (``hl.<prefix>.<host_id>``) consists of

* ``/<ns>.reg`` - the registry segment: a header and one small record per participant
  slot. Its file (``/dev/shm/<ns>.reg``) also carries every fcntl OFD lock (below), so a
  namespace is live exactly while its shared memory has a lock holder: deleting a file
  in ``shm_dir`` or configuring another ``shm_dir`` can no longer make a live namespace
  look dead (layout 5; before, the locks were in ``<shm_dir>/<ns>.lock``);
* ``/<ns>.s<i>`` - slot *i*'s segment: ring control, capacity buckets, group set, ring data;
* ``<shm_dir>/<ns>.bell<i>`` and ``<ns>.rescue<i>`` - FIFOs that wake slot *i*'s owner.

Lock bytes of the registry's file (fcntl *open file description* locks, released by the kernel
when the holder dies - this is what makes the layer survive SIGKILL at any instruction):

* ``INIT_LOCK``: held while a process attaches or detaches (creation, last-out cleanup);
* ``LEADER_LOCK``: the host's leader lease;
* ``SLOT_LOCK_BASE + i``: held by slot *i*'s owner for its whole life (liveness);
* ``RING_LOCK_BASE + i``: serialises writers into slot *i*'s ring.

Nothing here touches the OS; everything is offsets, sizes and struct formats.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

MAGIC = 0x48594252_4C415931  # "HYBRLAY1"
VERSION = 5  # 2: broker mode (outbound kinds, link words, tagged hashes); 3: broker_batches;
# 4: the host-queue dedupe table, link reason and sync-time words, new counters;
# 5: dropped_unauthenticated, the dedupe table's OWN bit; ring records carry a 12-bit
# name length (UTF-8 names up to NAME_MAX bytes); locks on the registry's own file,
# shm_dir and site recorded, process start times, flush-epoch check word,
# repaired/site_clash counters

#: where Linux (glibc's shm_open) keeps POSIX shared memory: ``/<name>`` is this file
SHM_FS = "/dev/shm"

INIT_LOCK = 0
LEADER_LOCK = 1
FLUSH_LOCK = 2
SLOT_LOCK_BASE = 0x10000
RING_LOCK_BASE = 0x20000

PAGE = 4096

# ---------------------------------------------------------------- registry segment
# header: magic, version, ring_bytes, max_participants, channel_buckets, group_slots,
#         leader_slot, leader_gen, leader_pid, leader_epoch, flush_epoch, slots_epoch,
#         created
# (8-byte fields are 8-aligned so that each store is a single untorn write)
REG_HEADER = struct.Struct("<QI4xQIII4xiIi4xQQQd")
H_LEADER = 40  # leader_slot, leader_gen, leader_pid
H_LEADER_EPOCH = 56
H_FLUSH_EPOCH = 64
H_SLOTS_EPOCH = 72
# word indices in the registry's typed views (q: u64, i: i32, I: u32)
HQ_LEADER_EPOCH = H_LEADER_EPOCH // 8
HQ_FLUSH_EPOCH = H_FLUSH_EPOCH // 8
HQ_SLOTS_EPOCH = H_SLOTS_EPOCH // 8
Hi_LEADER_SLOT = H_LEADER // 4
HI_LEADER_GEN = H_LEADER // 4 + 1
Hi_LEADER_PID = H_LEADER // 4 + 2
LEADER_FIELDS = struct.Struct("@iIi")
REG_SLOT = struct.Struct("<IIid")  # state, gen, pid, started
REG_SLOT_SIZE = 512
#: in a slot record: the owner's start time (clock ticks since boot, /proc/<pid>/stat),
#: so a pid is taken for the owner's only while it is the same process (u64)
REG_PSTART_OFFSET = 24
# header page, layout 5: what every process of the namespace must agree on, as text
H_SHM_DIR = 1024  # utf-8, NUL-padded: the shm_dir of the namespace's bells
H_SHM_DIR_LEN = 256
H_SITE = 1280  # u64 fingerprint (0: unknown), u64 flags (SITE_EXPLICIT), label text
H_SITE_LABEL = H_SITE + 16
H_SITE_LABEL_LEN = 240
SITE_EXPLICIT = 1
#: u64 = flush epoch ^ FLUSH_CHECK_KEY, written after the epoch: a flip of either word
#: is told from a real flush (see Namespace.flush_epoch_checked)
H_FLUSH_CHECK = 1536
FLUSH_CHECK_KEY = 0x5A17_F1A5_C0DE_D00D
REG_STATS_OFFSET = 64  # inside a registry slot record: mirrored statistics counters
STATS_FIELDS = (
    "sent",
    "received",
    "group_sends",
    "group_copies",
    "raised_full",
    "raised_too_large",
    "dropped_full",
    "dropped_expired",
    "dropped_no_channel",
    "dropped_corrupt",
    "dropped_dead_reader",
    "dropped_flushed",
    # broker mode (the leader's link; zero on a single host)
    "dropped_link_down",
    "dropped_remote_full",
    "dropped_malformed",
    "broker_published",
    "broker_confirmed",
    "broker_returned",
    "broker_received",
    "broker_reconnects",
    "broker_batches",  # AMQP messages that carried more than one message
    # broker mode, transitions (layout 4)
    "dropped_too_large",  # a frame from the broker over this host's max_message_bytes
    "broker_duplicates",  # redelivered or republished frames skipped (already delivered)
    "broker_retried",  # returned (no queue yet) and published again
    "broker_republished",  # unconfirmed when a connection died, published again
    "broker_claim_refused",  # attempts to claim the host_id that another connection holds
    "broker_nacked",  # rejected by their queue (full or failing), kept and tried again
    # issue 12: refused frames from the broker (a token that does not authenticate, a
    # replay, a route it was not sealed for, a spoofed origin)
    "dropped_unauthenticated",
    # layout 5
    "repaired",  # corrupted control words found and repaired (see Participant.check_words)
    "site_clash",  # another site found sharing this namespace (see Namespace.check_site)
)
REG_STATS = struct.Struct("@" + "Q" * len(STATS_FIELDS))
# the leader's link words, in its own registry slot record (u64 each, typed-view access):
REG_LINK_OFFSET = 448
LQ_STATE = 0  # LINK_* below
LQ_SYNCS = 1  # binding syncs completed
LQ_SYNCS_STARTED = 3  # binding syncs started (a group_add waits for one started after it)
LQ_BUSY = 4  # 1 while the leader's outbound queue is over its high-water mark
LQ_CHANGES = 2  # link state changes (participants notice drops and recoveries)
LQ_SYNC_AT = 5  # wall-clock ms when the last binding sync completed
LQ_REASON = 6  # why the link is not up: REASON_* below (0 while up)
LINK_NONE = 0  # single host, or no leader link yet
LINK_DOWN = 1
LINK_UP = 2
LINK_CONNECTING = 3  # a new leader's first attempt: hand-offs are buffered, not dropped
assert REG_STATS_OFFSET + REG_STATS.size <= REG_LINK_OFFSET
#: why a link is not up (``LQ_REASON``); the leader's log and ``statistics()`` say more
REASONS = {
    0: "",
    1: "broker unreachable",
    2: "broker refused the connection (credentials, vhost or permissions)",
    3: "TLS handshake failed",
    4: "timed out",
    5: "host_id claimed by another connection (another host with the same host_id?)",
    6: "connection lost",
    7: "declaring the host's queue failed",
}
REASON_UNREACHABLE = 1
REASON_REFUSED = 2
REASON_TLS = 3
REASON_TIMEOUT = 4
REASON_CLAIMED = 5
REASON_LOST = 6
REASON_DECLARE = 7

# the host-queue dedupe table, in the registry header page, written by the leader only:
# per publisher (a remote link's nonce) the highest (seq << 11 | frame) delivered, so
# that a new leader skips what its dead predecessor had delivered but not acknowledged
DEDUP_OFFSET = 2048
DEDUP_ENTRIES = 64
DEDUP_WORDS = 3  # nonce, high-water mark, last used (monotonic ms)
DQ_BASE = DEDUP_OFFSET // 8
assert DEDUP_OFFSET + DEDUP_ENTRIES * DEDUP_WORDS * 8 <= PAGE
assert REG_HEADER.size <= H_SHM_DIR
assert H_SITE_LABEL + H_SITE_LABEL_LEN <= H_FLUSH_CHECK < DEDUP_OFFSET

SLOT_FREE = 0
SLOT_LIVE = 1

# ---------------------------------------------------------------- slot segment
# control page: head and tail on their own cache lines, then fields written by the owner.
CTRL_HEAD = 0  # u64, written by the owner (reader) only
CTRL_TAIL = 64  # u64, written by writers holding the ring lock
CTRL_WAITING = 128  # u32, owner: "a receiver may be asleep, ring the bell"
CTRL_GEN = 132  # u32, incarnation of the slot's owner (set under the ring lock)
CTRL_STATE = 136  # u32, SLOT_LIVE / SLOT_FREE (set under the ring lock)
CTRL_FLUSH_UPTO = 144  # u64, flush(): records before this ring position are discarded
CTRL_FLUSH_ACK = 152  # u64, owner: the last flush epoch it has applied
CTRL_GROUP_SEQ = 192  # u64 seqlock of the group set, owner-written
CTRL_GROUP_USED = 200  # u32 entries in use (live + tombstones), owner-written
CTRL_GROUP_CHANGES = 208  # u64, owner: bumped on every change of the group set
# Words that one process reads while another writes them are accessed ONLY through
# typed memoryviews (``buf.cast("Q")[i]``), which load and store with one memcpy - a
# single aligned instruction. ``struct.pack_into`` must never be used on them: it first
# zeroes the field (memset) and then writes it, so a reader can see 0 in between.
U64 = struct.Struct("@Q")
U32 = struct.Struct("@I")
# word indices for the typed views of the control page
Q_HEAD = CTRL_HEAD // 8
Q_TAIL = CTRL_TAIL // 8
I_WAITING = CTRL_WAITING // 4
I_GEN = CTRL_GEN // 4
I_STATE = CTRL_STATE // 4
Q_FLUSH_UPTO = CTRL_FLUSH_UPTO // 8
Q_FLUSH_ACK = CTRL_FLUSH_ACK // 8
Q_GROUP_SEQ = CTRL_GROUP_SEQ // 8
I_GROUP_USED = CTRL_GROUP_USED // 4
Q_GROUP_CHANGES = CTRL_GROUP_CHANGES // 8

# capacity buckets: per bucket two u32 counters, ``enq`` (writers, under the ring lock)
# and ``deq`` (owner only). pending = (enq - deq) mod 2**32.
BUCKET = struct.Struct("@II")

# ring records: header then body (name bytes, then the msgpack message)
# total body length, magic, ``name length << 4 | kind``, expires_at (CLOCK_MONOTONIC s)
# Names are UTF-8: channels' name rules (``\d``, ``\w``) accept any Unicode digit or
# letter, up to 4 bytes each, so a valid name (< 100 characters) takes up to 396 bytes.
RECORD = struct.Struct("<IHHd")
RECORD_MAGIC = 0xB17E
KIND_BITS = 4
KIND_MASK = (1 << KIND_BITS) - 1
NAME_MAX = 0xFFFF >> KIND_BITS  # 4095 bytes
KIND_DIRECT = 1  # to a process channel of the owner
KIND_GROUP = 2  # a group message: the owner fans it out to its local members
KIND_NORMAL = 3  # to a normal (multi-reader) channel
KIND_CONTROL = 4  # control verb in the name field, msgpack arguments in the body
# broker mode: handed to the leader, which publishes them (name = destination)
KIND_OUT_DIRECT = 5  # to a process channel of another host
KIND_OUT_GROUP = 6  # a group message for the other hosts
KIND_OUT_NORMAL = 7  # to a normal channel with no reader on this host
KINDS = frozenset(range(KIND_DIRECT, KIND_OUT_NORMAL + 1))
assert max(KINDS) <= KIND_MASK
ALIGN = 16  # = record header size: a header never straddles the end


def align(n: int) -> int:
    return (n + ALIGN - 1) & ~(ALIGN - 1)


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@dataclass(frozen=True, slots=True)
class SlotLayout:
    """Offsets inside one slot segment for a given sizing."""

    ring_bytes: int
    channel_buckets: int
    group_slots: int

    @classmethod
    def for_sizes(cls, ring_bytes: int, channel_buckets: int, max_groups: int) -> SlotLayout:
        # group set at most half full: 2x entries, rounded to a power of two
        return cls(align(ring_bytes), channel_buckets, next_pow2(2 * max_groups))

    @property
    def buckets_offset(self) -> int:
        return PAGE

    @property
    def bucket_count(self) -> int:
        """Process-channel buckets followed by normal-channel buckets."""
        return 2 * self.channel_buckets

    @property
    def groups_offset(self) -> int:
        end = self.buckets_offset + self.bucket_count * BUCKET.size
        return (end + PAGE - 1) // PAGE * PAGE

    @property
    def ring_offset(self) -> int:
        end = self.groups_offset + self.group_slots * 8
        return (end + PAGE - 1) // PAGE * PAGE

    @property
    def size(self) -> int:
        return self.ring_offset + self.ring_bytes


def registry_size(max_participants: int) -> int:
    return PAGE + max_participants * REG_SLOT_SIZE


def reg_slot_offset(i: int) -> int:
    return PAGE + i * REG_SLOT_SIZE
