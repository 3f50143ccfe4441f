"""Run the peers' own layer test suites against hybrid_layer (``make peers``).

Suites:
- ``channels``: channels 4.3.2's ``tests/test_inmemorychannel.py``, ``test_layers.py`` and
  ``test_generic_websocket.py``. channels' sdist ships no tests and this project does
  not copy them, so this suite runs only when given a checkout of channels' ``tests/``
  folder at that tag (``--channels-tests DIR`` or ``HYBRID_LAYER_CHANNELS_TESTS``);
  without one it is skipped, saying so.
- ``channels_redis``: ``tests/test_core.py`` and ``tests/test_pubsub.py`` of the
  channels_redis sdist (``pip download --no-binary :all:``, cached under
  ``build/peers/``). channels_redis is not a dependency of ours; its tests import
  ``channels_redis`` itself (taken from the sdist, not installed), ``redis``,
  ``msgpack`` and ``async_timeout``; those and ``pytest-django`` (channels' websocket
  tests) are installed with ``pip --target build/peers/site``, never into ``.venv``.

Only the construction of the layer is swapped (``hl_peer_adapter.py``); checks made
through a peer's private attributes are rewritten to ask hybrid_layer's public API
(``REWRITES`` below, listed in tests/PEER_SUITES.md). Each test has a timeout, a
namespace of its own, and its layers closed after it; the run fails if shared-memory
names or RabbitMQ queues of its prefixes are left.

    .venv/bin/python tests/peers/run_peer_suites.py [--suite channels|channels_redis|all]
        [--mode single|broker|both] [--timeout 20]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tarfile
import time
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
BUILD = REPO / "build" / "peers"
SITE = BUILD / "site"
CHANNELS_TESTS: Path | None = None  # --channels-tests
BROKER = os.environ.get("HYBRID_LAYER_TEST_BROKER", "amqp://guest:guest@127.0.0.1:5672/")

CHANNELS_VERSION = "4.3.2"  # the version of channels' tests the rewrites fit
CHANNELS_REDIS_VERSION = "4.3.0"
#: what the peers' tests import beyond .venv, installed into build/peers/site only
#: (daphne without its dependencies: channels.testing imports daphne.testing, which
#: imports nothing of Twisted's at module level; no test here starts a daphne server)
TEST_DEPS = ["redis>=4.6,<9", "msgpack~=1.0", "async-timeout", "pytest-django", "daphne"]

CHANNELS_FILES = ["test_inmemorychannel.py", "test_layers.py", "test_generic_websocket.py"]
REDIS_FILES = ["test_core.py", "test_pubsub.py"]

# (file, old, new, expected count): checks through a peer's private attributes, asked
# through hybrid_layer's public API instead (see hl_peer_adapter and PEER_SUITES.md)
_CH = '"test-channel-1", "test-channel-2"'
REWRITES: list[tuple[str, str, str, int]] = [
    # InMemory's ``channels`` dict (channels holding messages) -> channel_statistics()
    (
        "test_inmemorychannel.py",
        'assert "test-channel-1" in channel_layer.channels',
        f'assert "test-channel-1" in waiting_channels(channel_layer, {_CH})',
        1,
    ),
    (
        "test_inmemorychannel.py",
        'assert "test-channel-1" not in channel_layer.channels',
        f'assert "test-channel-1" not in waiting_channels(channel_layer, {_CH})',
        1,
    ),
    (
        "test_inmemorychannel.py",
        "len(channel_layer.channels)",
        f"len(waiting_channels(channel_layer, {_CH}))",
        5,
    ),
    # InMemory's ``groups == {}`` after disconnect -> statistics() and a probe group_send
    (
        "test_generic_websocket.py",
        "assert channel_layer.groups == {}",
        'assert await group_is_empty(channel_layer, "chat")',
        2,
    ),
    # the consumer's channel name, read from InMemory's ``channels`` -> the consumer's
    # own public ``channel_name`` (``app`` is the consumer instance in these tests)
    (
        "test_generic_websocket.py",
        "channel_name = list(channel_layer.channels.keys())[0]",
        "channel_name = app.channel_name",
        3,
    ),
    # RedisChannelLayer's ``client_prefix`` (the process part of its channel names) ->
    # the names the two layers mint
    (
        "test_core.py",
        "assert channel_layer_1.client_prefix != channel_layer_2.client_prefix",
        "assert await channel_layer_1.new_channel() != await channel_layer_2.new_channel()",
        1,
    ),
]
IMPORTS = {
    "test_inmemorychannel.py": "from hl_peer_adapter import waiting_channels\n",
    "test_generic_websocket.py": "from hl_peer_adapter import group_is_empty\n",
}

CHANNELS_CONFTEST = '''\
"""Written by tests/peers/run_peer_suites.py: InMemoryChannelLayer -> PeerLayer."""
import channels.layers
from hl_peer_adapter import PeerLayer, _hybrid_namespace  # noqa: F401

channels.layers.InMemoryChannelLayer = PeerLayer
'''
REDIS_CONFTEST = '''\
"""Written by tests/peers/run_peer_suites.py: the Redis layers -> PeerLayer."""
import channels_redis.core
import channels_redis.pubsub
from hl_peer_adapter import PeerLayer, _hybrid_namespace  # noqa: F401

channels_redis.core.RedisChannelLayer = PeerLayer
channels_redis.pubsub.RedisPubSubChannelLayer = PeerLayer
'''
# channels' sample_project settings without ``daphne`` (its runserver only; it would
# pull in Twisted) and the sample app (models none of these tests use)
CHANNELS_SETTINGS = """\
SECRET_KEY = "Not_a_secret_key"
DEBUG = True
INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "channels",
]
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": "peer.sqlite3",
                         "TEST": {"NAME": "peer_test.sqlite3"}}}
USE_TZ = True
CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
"""


# the failures recorded in tests/PEER_SUITES.md, each classified there: a failure not
# listed here fails the run (a regression); one listed that passes is reported (a fix:
# update the list and PEER_SUITES.md)
_PRIVATE_REDIS = {
    "test_core::test_default_group_key_format",
    "test_core::test_custom_group_key_format",
    "test_core::test_receive_buffer_respects_capacity",
    "test_pubsub::test_loop_instance_channel_layer_reference",
    "test_pubsub::test_serialize",
    "test_pubsub::test_deserialize",
    "test_pubsub::test_multi_event_loop_garbage_collection",
    "test_pubsub::test_auto_reconnect",
    "test_pubsub::test_receive_on_non_owned_general_channel",
    "test_core::test_group_send_capacity",
    # fails on channels_redis' log text whenever our WARNING for its drop is not
    # suppressed by the rate limiter (i.e. the previous test logged none): either way
    "test_core::test_group_send_capacity_multiple_channels",
    "test_core::test_reject_bad_client_prefix",
}
KNOWN_FAILURES: dict[tuple[str, str], set[str]] = {
    ("channels", "single"): {
        "test_inmemorychannel::test_race_empty",
        "test_inmemorychannel::test_expiry_unread",
    },
    ("channels", "broker"): {
        "test_inmemorychannel::test_race_empty",
        "test_inmemorychannel::test_send_capacity",
        "test_inmemorychannel::test_expiry_single",
        "test_inmemorychannel::test_expiry_unread",
    },
    ("channels_redis", "single"): _PRIVATE_REDIS,
    ("channels_redis", "broker"): _PRIVATE_REDIS
    | {"test_core::test_send_capacity", "test_core::test_send_specific_capacity"},
}


@dataclass
class Result:
    suite: str
    mode: str
    counts: dict[str, int] = field(default_factory=dict)
    failures: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "-q", *args], check=True)


def prepare() -> Path:
    """Test dependencies into build/peers/site; channels_redis' sdist unpacked."""
    BUILD.mkdir(parents=True, exist_ok=True)
    marker = SITE / (".ok-" + "-".join(TEST_DEPS).replace("/", "_"))
    if not marker.exists():
        pip("install", "--upgrade", "--no-deps", "--target", str(SITE), *TEST_DEPS)
        marker.touch()
    src = BUILD / f"channels_redis-{CHANNELS_REDIS_VERSION}"
    if not (src / "tests" / "test_core.py").exists():
        sdist = BUILD / f"channels_redis-{CHANNELS_REDIS_VERSION}.tar.gz"
        if not sdist.exists():
            pip("download", "--no-deps", "--no-binary", ":all:", "-d", str(BUILD),
                f"channels_redis=={CHANNELS_REDIS_VERSION}")  # fmt: skip
        with tarfile.open(sdist) as tar:
            tar.extractall(BUILD, filter="data")
    return src


def rewrite(name: str, text: str) -> str:
    for file, old, new, count in REWRITES:
        if file != name:
            continue
        found = text.count(old)
        if found != count:
            raise SystemExit(f"{name}: expected {count}x {old!r}, found {found}")
        text = text.replace(old, new)
    if name in IMPORTS:
        text = IMPORTS[name] + text
    return text


def make_rundir(suite: str, mode: str, redis_src: Path) -> Path:
    run = BUILD / "run" / f"{suite}-{mode}"
    shutil.rmtree(run, ignore_errors=True)
    (run / "tests").mkdir(parents=True)
    (run / "tests" / "__init__.py").write_text("")
    ini = ["[pytest]", "asyncio_mode = auto", "asyncio_default_fixture_loop_scope = function"]
    if suite == "channels":
        for f in CHANNELS_FILES:
            text = (CHANNELS_TESTS / f).read_text()
            (run / "tests" / f).write_text(rewrite(f, text))
        (run / "tests" / "conftest.py").write_text(CHANNELS_CONFTEST)
        (run / "peer_settings.py").write_text(CHANNELS_SETTINGS)
        ini.append("DJANGO_SETTINGS_MODULE = peer_settings")
    else:
        for f in REDIS_FILES:
            text = (redis_src / "tests" / f).read_text()
            (run / "tests" / f).write_text(rewrite(f, text))
        (run / "tests" / "conftest.py").write_text(REDIS_CONFTEST)
    (run / "pytest.ini").write_text("\n".join(ini) + "\n")
    return run


def shm_left(run_id: str) -> list[str]:
    return sorted(n for n in os.listdir("/dev/shm") if f".p{run_id}" in n)


def broker_queues() -> list[str]:
    out = subprocess.run(
        ["rabbitmqctl", "-q", "list_queues", "name"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    return [line.strip() for line in out.splitlines()[1:] if line.strip()]


def delete_queues(names: list[str]) -> None:
    import aiormq

    async def run() -> None:
        conn = await aiormq.connect(BROKER)
        try:
            ch = await conn.channel()
            for n in names:
                await ch.queue_delete(n)
        finally:
            await conn.close()

    asyncio.run(run())


def run_suite(suite: str, mode: str, timeout: float, redis_src: Path) -> Result:
    run = make_rundir(suite, mode, redis_src)
    run_id = uuid.uuid4().hex[:6]
    prefixes = run / "prefixes.txt"
    paths = [run, HERE, SITE, *([redis_src] if suite == "channels_redis" else []), REPO]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(map(str, paths)),
        "HL_PEER_MODE": mode,
        "HL_PEER_BROKER": BROKER,
        "HL_PEER_RUN": run_id,
        "HL_PEER_PREFIXES": str(prefixes),
    }
    env.pop("DJANGO_SETTINGS_MODULE", None)
    junit = run / "junit.xml"
    cmd = [
        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE",
        f"--timeout={timeout}", f"--junitxml={junit}", "tests",
    ]  # fmt: skip
    if suite == "channels_redis":
        cmd[-1:-1] = ["-p", "no:django"]  # as channels_redis' own setup.cfg
    res = Result(suite, mode)
    t0 = time.monotonic()
    with open(run / "output.txt", "w") as out:
        subprocess.run(cmd, cwd=run, env=env, stdout=out, stderr=subprocess.STDOUT)
    res.seconds = time.monotonic() - t0
    parse_junit(junit, res)
    left = shm_left(run_id)
    if left:
        res.problems.append(f"shared-memory names left: {left}")
    if mode == "broker":
        mine = set(prefixes.read_text().split()) if prefixes.exists() else set()
        try:
            ours = [q for q in broker_queues() if q.split(".", 1)[0] in mine]
            if ours:
                delete_queues([q for q in ours if not q.endswith(".claim")])
            still = [q for q in broker_queues() if q.split(".", 1)[0] in mine]
            if still:
                res.problems.append(f"RabbitMQ queues left: {still}")
        except (OSError, subprocess.SubprocessError) as e:
            res.problems.append(f"could not list RabbitMQ queues: {e}")
    return res


def parse_junit(path: Path, res: Result) -> None:
    counts = dict.fromkeys(("passed", "failed", "error", "skipped", "xfailed"), 0)
    if not path.exists():
        res.problems.append("pytest wrote no report (see output.txt)")
        res.counts = counts
        return
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        kinds = {c.tag: c for c in case}
        if "failure" in kinds or "error" in kinds:
            el = kinds.get("failure", kinds.get("error"))
            assert el is not None
            kind = "failed" if "failure" in kinds and "error" not in kinds else "error"
            counts[kind] += 1
            msg = (el.get("message") or "").strip().splitlines()
            res.failures.append((name, (msg[0] if msg else el.tag)[:160]))
        elif "skipped" in kinds:
            skip = kinds["skipped"]
            key = "xfailed" if skip.get("type") == "pytest.xfail" else "skipped"
            counts[key] += 1
        else:
            counts["passed"] += 1
    res.counts = counts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suite", choices=["channels", "channels_redis", "all"], default="all")
    ap.add_argument("--mode", choices=["single", "broker", "both"], default="both")
    ap.add_argument("--timeout", type=float, default=20.0, help="seconds per test")
    ap.add_argument(
        "--channels-tests",
        type=Path,
        default=os.environ.get("HYBRID_LAYER_CHANNELS_TESTS") or None,
        help="channels' tests/ folder (a checkout of django/channels at "
        f"{CHANNELS_VERSION}): its sdist ships none",
    )
    ap.add_argument(
        "--drop-check",
        action="store_true",
        help="close only the layers still referenced after a test (not those the test "
        "dropped without close()): shows whether a dropped layer releases its namespace",
    )
    args = ap.parse_args()
    global CHANNELS_TESTS
    CHANNELS_TESTS = args.channels_tests
    if args.drop_check:
        os.environ["HL_PEER_DROP_CHECK"] = "1"
    if version("channels") != CHANNELS_VERSION:
        print(f"note: channels {version('channels')} installed; the tests are "
              f"{CHANNELS_VERSION}'s", file=sys.stderr)  # fmt: skip
    redis_src = prepare()
    suites = ["channels", "channels_redis"] if args.suite == "all" else [args.suite]
    if "channels" in suites and (
        CHANNELS_TESTS is None or not all((CHANNELS_TESTS / f).is_file() for f in CHANNELS_FILES)
    ):
        print(
            "channels suite SKIPPED: channels' sdist ships no tests; pass --channels-tests "
            f"DIR (channels' tests/ folder at {CHANNELS_VERSION}) to run it",
            file=sys.stderr,
        )
        suites.remove("channels")
    modes = ["single", "broker"] if args.mode == "both" else [args.mode]
    t0 = time.monotonic()
    results = []
    for suite in suites:  # one at a time: the machine is shared
        for mode in modes:
            r = run_suite(suite, mode, args.timeout, redis_src)
            results.append(r)
            c = r.counts
            print(
                f"{suite:15} {mode:7} passed {c['passed']:3}  failed {c['failed']:3}  "
                f"errors {c['error']:2}  skipped {c['skipped']:2}  xfailed "
                f"{c['xfailed']:2}  {r.seconds:6.1f}s", flush=True,
            )  # fmt: skip
            for name, msg in r.failures:
                print(f"    FAIL {name}: {msg}")
            for p in r.problems:
                print(f"    PROBLEM {p}")
    print(f"total wall time {time.monotonic() - t0:.1f}s (reports: {BUILD / 'run'})")
    bad = False
    for r in results:
        known = KNOWN_FAILURES[(r.suite, r.mode)]
        failed = {name for name, _ in r.failures}
        for name in sorted(failed - known):
            print(f"NEW FAILURE {r.suite} {r.mode}: {name}")
            bad = True
        for name in sorted(known - failed):
            print(f"known failure passed {r.suite} {r.mode}: {name} (intermittent, or fixed)")
        bad = bad or bool(r.problems)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
