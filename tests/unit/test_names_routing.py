"""Unit and property tests for ``hybrid_layer.names`` and ``hybrid_layer.routing``."""

from __future__ import annotations

import pytest
from channels.layers import BaseChannelLayer
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from hybrid_layer import names
from hybrid_layer.names import ProcessAddress, is_process_channel, mint, parse
from hybrid_layer.routing import Action, Destination, GroupTable, Route, route

_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-"

#: host ids as config.py accepts them: 1-32 of letters, digits, '-' or '_'
host_ids = st.text(alphabet=_ID_ALPHABET, min_size=1, max_size=32)
#: new_channel prefixes as users write them: channels-valid characters, no '!'
prefixes = st.one_of(
    st.sampled_from(["specific.", "", "specific", "daphne.response.", "a.b.c.", "x-y_z."]),
    st.text(alphabet=_ID_ALPHABET + ".", max_size=20),
)
slots = st.integers(min_value=0, max_value=1023)  # config: max_participants <= 1024
gens = st.integers(min_value=1, max_value=2**32 - 1)  # a u32 in the slot's control page, never 0
buckets = st.integers(min_value=0, max_value=2**20 - 1)  # channel_buckets <= 2**20

_valid = BaseChannelLayer()


# ====================================================================== names
class TestMintParse:
    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(prefix=prefixes, host_id=host_ids, slot=slots, gen=gens, bucket=buckets)
    def test_round_trip(self, prefix: str, host_id: str, slot: int, gen: int, bucket: int) -> None:
        name = mint(prefix, host_id, slot, gen, bucket)
        assert name.startswith(prefix)
        assert is_process_channel(name)
        assert parse(name) == ProcessAddress(host_id, slot, gen, bucket)

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        prefix=st.text(alphabet=_ID_ALPHABET + ".", max_size=25),
        host_id=host_ids,
        slot=slots,
        gen=gens,
        bucket=buckets,
    )
    def test_minted_names_are_valid_channel_names(
        self, prefix: str, host_id: str, slot: int, gen: int, bucket: int
    ) -> None:
        name = mint(prefix, host_id, slot, gen, bucket)
        assert len(name) < 100
        assert _valid.require_valid_channel_name(name)

    def test_default_prefix_shape(self) -> None:
        name = mint("specific.", "h0123456789", 5, 0x1A, 0xFFF)
        assert name.startswith("specific.h0123456789.5.1a!fff.")  # no doubled dot
        token = name.rsplit(".", 1)[1]
        assert len(token) == 12
        int(token, 16)  # hex
        assert parse(name) == ProcessAddress("h0123456789", 5, 0x1A, 0xFFF)
        assert _valid.require_valid_channel_name(name)

    def test_worst_case_length_with_default_prefix(self) -> None:
        name = mint("specific.", "h" * 32, 1023, 2**32 - 1, 2**20 - 1)
        assert len(name) < 100
        assert _valid.require_valid_channel_name(name)

    def test_prefix_with_many_dots(self) -> None:
        name = mint("a.b.c.d.e.", "host", 1, 2, 3)
        assert parse(name) == ProcessAddress("host", 1, 2, 3)

    def test_tokens_are_unique(self) -> None:
        minted = {mint("specific.", "h", 1, 1, 0) for _ in range(2000)}
        assert len(minted) == 2000

    def test_is_process_channel(self) -> None:
        assert is_process_channel("a!b")
        assert is_process_channel("a!")
        assert not is_process_channel("http.request")


class TestParseRejects:
    @pytest.mark.parametrize(
        "name",
        [
            "",
            "http.request",  # a normal channel
            "specific.",
            "foo!",  # channels_redis style, bare
            "foo!abc",  # another layer's process channel: no bucket.token
            "specific.abc!def",  # too few dotted parts before '!'
            "a.b.c!1.tok",  # three parts only
            "a.h.1.2!3",  # no token
            "a.h.1.2!3.",  # empty token
            "a.h.1.2!.tok",  # empty bucket
            "a.h.zz.2!3.tok",  # slot not hex
            "a.h.1.g!3.tok",  # gen not hex
            "a.h.1.2!q.tok",  # bucket not hex
            "a.h..2!3.tok",  # empty slot
            "a.h.1.!3.tok",  # empty gen
            "!1.tok",
        ],
    )
    def test_foreign_names_parse_to_none(self, name: str) -> None:
        assert parse(name) is None

    @pytest.mark.parametrize(
        "name",
        [
            # BUG (reported): int(s, 16) accepts a sign, so names this module never mints
            # parse to negative numbers. They pass channels' name validation. A negative
            # bucket gets past Participant.send's ``addr.bucket >= self.K`` check and
            # reaches Registry.write(bucket=-1), where a negative bucket means "skip the
            # capacity check": a crafted name bypasses `capacity` for the receiver.
            "specific..h.1.2!-1.tok",  # negative bucket
            "specific..h.-1.2!0.tok",  # negative slot
            "specific..h.1.-2!0.tok",  # negative gen
        ],
    )
    def test_negative_numbers_parse_to_none(self, name: str) -> None:
        assert _valid.require_valid_channel_name(name)  # channels lets them through
        assert parse(name) is None

    @pytest.mark.parametrize(
        "name",
        [
            # BUG (reported, benign): aliases that int(s, 16) also accepts; the docstring
            # promises None for names not minted here.
            "specific..h.0x1.2!0.tok",  # 0x prefix: an alias of slot 1
            "specific..h.1.2!1_0.tok",  # underscore: an alias of bucket 0x10
        ],
    )
    def test_non_canonical_numbers_parse_to_none(self, name: str) -> None:
        assert _valid.require_valid_channel_name(name)
        assert parse(name) is None

    @example(prefix="specific.", host_id="h", numbers=["0", "0", "-1"], token="t")
    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        prefix=prefixes,
        host_id=host_ids,
        numbers=st.lists(
            st.text(alphabet="0123456789abcdefABx_-", max_size=6), min_size=3, max_size=3
        ),
        token=st.text(alphabet=_ID_ALPHABET + ".", max_size=12),
    )
    def test_whatever_parses_has_non_negative_fields(
        self, prefix: str, host_id: str, numbers: list[str], token: str
    ) -> None:
        slot_s, gen_s, bucket_s = numbers
        name = f"{prefix}.{host_id}.{slot_s}.{gen_s}!{bucket_s}.{token}"
        addr = parse(name)
        if addr is None:
            return
        assert addr.host_id == host_id
        assert addr.slot >= 0
        assert addr.gen >= 1  # 0 would match whichever process holds the slot now
        assert addr.bucket >= 0

    @pytest.mark.parametrize("gen", ["0", "00", "00000000", "01"])
    def test_incarnation_zero_never_parses(self, gen: str) -> None:
        """Issue 12 (9a): the ring writer treats gen 0 as "any live incarnation", so a
        crafted name with gen 0 reached whichever process held the slot. No process is
        ever given gen 0: such a name is nobody's, and unroutable."""
        name = f"specific.hostA.3.{gen}!0.abcdef"
        assert _valid.require_valid_channel_name(name)
        assert parse(name) is None
        dest = route(name, "hostA", 5, 9)
        assert dest == Destination(Route.UNROUTABLE, None)

    def test_mint_refuses_incarnation_zero(self) -> None:
        with pytest.raises(ValueError, match="incarnation"):
            mint("specific.", "h", 1, 0, 0)


# ====================================================================== route()
HOST = "hostA"
ME_SLOT, ME_GEN = 3, 7


class TestRoute:
    def test_own(self) -> None:
        name = mint("specific.", HOST, ME_SLOT, ME_GEN, 9)
        assert route(name, HOST, ME_SLOT, ME_GEN) == Destination(
            Route.OWN, ProcessAddress(HOST, ME_SLOT, ME_GEN, 9)
        )

    def test_other_slot(self) -> None:
        name = mint("specific.", HOST, 4, ME_GEN, 1)
        dest = route(name, HOST, ME_SLOT, ME_GEN)
        assert dest.route is Route.SLOT
        assert dest.address == ProcessAddress(HOST, 4, ME_GEN, 1)

    def test_my_slot_previous_incarnation_is_not_own(self) -> None:
        """A dead process's channel on my recycled slot is not mine."""
        name = mint("specific.", HOST, ME_SLOT, ME_GEN - 1, 0)
        dest = route(name, HOST, ME_SLOT, ME_GEN)
        assert dest.route is Route.SLOT
        assert dest.address is not None
        assert dest.address.gen == ME_GEN - 1

    @pytest.mark.parametrize("name", ["http.request", "chat.room_1", "a", "x" * 99])
    def test_normal(self, name: str) -> None:
        assert route(name, HOST, ME_SLOT, ME_GEN) == Destination(Route.NORMAL, None)

    def test_other_host_is_unroutable_with_address(self) -> None:
        name = mint("specific.", "hostB", ME_SLOT, ME_GEN, 2)
        dest = route(name, HOST, ME_SLOT, ME_GEN)
        assert dest.route is Route.UNROUTABLE
        assert dest.address == ProcessAddress("hostB", ME_SLOT, ME_GEN, 2)

    @pytest.mark.parametrize("name", ["foo!", "foo!abc", "specific.x!y", "a.h.z.1!0.t"])
    def test_foreign_process_channel_is_unroutable(self, name: str) -> None:
        assert route(name, HOST, ME_SLOT, ME_GEN) == Destination(Route.UNROUTABLE, None)

    def test_host_id_compared_exactly(self) -> None:
        for other in ("hosta", "hostA2", "ostA"):
            name = mint("specific.", other, ME_SLOT, ME_GEN, 0)
            assert route(name, HOST, ME_SLOT, ME_GEN).route is Route.UNROUTABLE

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(host=host_ids, slot=slots, gen=gens, bucket=buckets, me=st.tuples(slots, gens))
    def test_route_agrees_with_parse(
        self, host: str, slot: int, gen: int, bucket: int, me: tuple[int, int]
    ) -> None:
        name = mint("specific.", host, slot, gen, bucket)
        dest = route(name, HOST, *me)
        if host != HOST:
            expected = Route.UNROUTABLE
        elif (slot, gen) == me:
            expected = Route.OWN
        else:
            expected = Route.SLOT
        assert dest.route is expected
        assert dest.address == ProcessAddress(host, slot, gen, bucket)


# ====================================================================== GroupTable
class TestGroupTable:
    def test_join_and_leave(self) -> None:
        t = GroupTable()
        assert t.add("g", "c1", 0.0) is Action.JOIN
        assert t.add("g", "c2", 0.0) is Action.NONE
        assert t.add("g", "c1", 1.0) is Action.NONE  # re-add
        assert len(t) == 1
        assert t.discard("g", "c1") is Action.NONE
        assert t.discard("g", "c1") is Action.NONE  # already gone
        assert t.discard("g", "c2") is Action.LEAVE
        assert len(t) == 0
        assert "g" not in t.groups
        assert t.add("g", "c1", 2.0) is Action.JOIN  # joins again

    def test_discard_unknown(self) -> None:
        t = GroupTable()
        assert t.discard("nope", "c") is Action.NONE
        t.add("g", "c", 0.0)
        assert t.discard("g", "other") is Action.NONE
        assert t.discard("other", "c") is Action.NONE
        assert len(t) == 1

    def test_members_and_expiry(self) -> None:
        t = GroupTable()
        t.add("g", "old", 0.0)
        t.add("g", "new", 50.0)
        members, expired, action = t.members("g", now=100.0, expiry=60.0)
        assert members == ["new"]
        assert expired == 1
        assert action is Action.NONE
        assert t.groups == {"g": {"new": 50.0}}

    def test_expiry_boundary_is_kept(self) -> None:
        t = GroupTable()
        t.add("g", "c", 40.0)
        assert t.members("g", now=100.0, expiry=60.0) == (["c"], 0, Action.NONE)
        assert t.members("g", now=100.0001, expiry=60.0) == ([], 1, Action.LEAVE)
        assert len(t) == 0

    def test_all_expired_is_leave(self) -> None:
        t = GroupTable()
        t.add("g", "a", 0.0)
        t.add("g", "b", 1.0)
        t.add("h", "a", 0.0)
        assert t.members("g", now=1000.0, expiry=10.0) == ([], 2, Action.LEAVE)
        assert "g" not in t.groups
        assert "h" in t.groups  # other groups are untouched until asked
        assert t.members("g", now=1000.0, expiry=10.0) == ([], 0, Action.NONE)

    def test_re_add_refreshes_expiry(self) -> None:
        t = GroupTable()
        t.add("g", "c", 0.0)
        t.add("g", "c", 90.0)
        assert t.members("g", now=100.0, expiry=60.0) == (["c"], 0, Action.NONE)

    def test_members_of_unknown_group(self) -> None:
        assert GroupTable().members("g", now=0.0, expiry=1.0) == ([], 0, Action.NONE)

    def test_clear(self) -> None:
        t = GroupTable()
        t.add("a", "c", 0.0)
        t.add("b", "c", 0.0)
        assert sorted(t.clear()) == ["a", "b"]
        assert len(t) == 0
        assert t.clear() == []
        assert t.add("a", "c", 0.0) is Action.JOIN


_groups = st.sampled_from(["g1", "g2", "g3"])
_channels = st.sampled_from(["c1", "c2", "c3", "c4"])


class GroupTableVsDict(RuleBasedStateMachine):
    """GroupTable against a dict of dicts; ``now`` only moves forward."""

    def __init__(self) -> None:
        super().__init__()
        self.table = GroupTable()
        self.model: dict[str, dict[str, float]] = {}
        self.now = 0.0
        self.joined: set[str] = set()  # what the caller would have published (JOIN - LEAVE)

    def _act(self, group: str, action: Action) -> None:
        if action is Action.JOIN:
            assert group not in self.joined
            self.joined.add(group)
        elif action is Action.LEAVE:
            assert group in self.joined
            self.joined.discard(group)

    @rule(dt=st.floats(min_value=0, max_value=30, allow_nan=False))
    def tick(self, dt: float) -> None:
        self.now += dt

    @rule(group=_groups, channel=_channels)
    def add(self, group: str, channel: str) -> None:
        expected = Action.NONE if group in self.model else Action.JOIN
        action = self.table.add(group, channel, self.now)
        assert action is expected
        self.model.setdefault(group, {})[channel] = self.now
        self._act(group, action)

    @rule(group=_groups, channel=_channels)
    def discard(self, group: str, channel: str) -> None:
        members = self.model.get(group, {})
        expected = Action.LEAVE if members.keys() == {channel} else Action.NONE
        action = self.table.discard(group, channel)
        assert action is expected
        if channel in members:
            del members[channel]
            if not members:
                del self.model[group]
        self._act(group, action)

    @rule(group=_groups, expiry=st.sampled_from([1.0, 10.0, 45.0, 86400.0]))
    def members(self, group: str, expiry: float) -> None:
        members = self.model.get(group, {})
        cutoff = self.now - expiry
        keep = {c: t for c, t in members.items() if t >= cutoff}
        n_expired = len(members) - len(keep)
        expected_action = Action.LEAVE if members and not keep else Action.NONE
        got, expired, action = self.table.members(group, self.now, expiry)
        assert sorted(got) == sorted(keep)
        assert expired == n_expired
        assert action is expected_action
        if keep:
            self.model[group] = keep
        else:
            self.model.pop(group, None)
        self._act(group, action)

    @rule()
    def clear(self) -> None:
        gone = self.table.clear()
        assert sorted(gone) == sorted(self.model)
        self.model.clear()
        self.joined.clear()  # the caller un-publishes everything clear() returned

    @invariant()
    def same(self) -> None:
        assert self.table.groups == self.model
        assert len(self.table) == len(self.model)
        assert all(self.table.groups.values()), "no empty group is kept"
        assert self.joined == set(self.model), "JOIN/LEAVE actions track non-emptiness"


GroupTableVsDict.TestCase.settings = settings(
    max_examples=80,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestGroupTableVsDict = GroupTableVsDict.TestCase


def test_parse_is_cached_but_pure() -> None:
    """parse() is memoised; the cache must not make distinct names share results."""
    a = mint("specific.", "h", 1, 2, 3)
    b = mint("specific.", "h", 1, 2, 4)
    assert parse(a) == ProcessAddress("h", 1, 2, 3)
    assert parse(b) == ProcessAddress("h", 1, 2, 4)
    assert names.parse(a) is parse(a)
