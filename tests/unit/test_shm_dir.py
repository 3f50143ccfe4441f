"""The shm_dir safety check (config.shm_dir_problem), shared by the layer's constructor
and the Django system check E002, and the owner texts of hybrid_layer.shm.owner."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest

from hybrid_layer import HybridChannelLayer, NamespaceTaken
from hybrid_layer.config import shm_dir_problem
from hybrid_layer.shm.owner import describe, taken, user_text

NOBODY = 65534
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")


def mkdir(path: Path, mode: int) -> str:
    path.mkdir()
    os.chmod(path, mode)
    return str(path)


@pytest.mark.parametrize("mode", [0o700, 0o755, 0o1777, 0o1770])
def test_safe_directories(tmp_path: Path, mode: int) -> None:
    assert shm_dir_problem(mkdir(tmp_path / "d", mode)) is None


def test_dev_shm_is_safe() -> None:
    assert shm_dir_problem("/dev/shm") is None


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o722])
def test_writable_by_others_without_the_sticky_bit(tmp_path: Path, mode: int) -> None:
    d = mkdir(tmp_path / "d", mode)
    problem = shm_dir_problem(d)
    assert problem is not None and d in problem and "without the sticky bit" in problem


def test_missing_and_not_a_directory(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope")
    assert "No such file" in (shm_dir_problem(missing) or "")
    f = tmp_path / "f"
    f.write_text("")
    assert "not a directory" in (shm_dir_problem(str(f)) or "")


def test_inside_a_directory_others_may_rename_in(tmp_path: Path) -> None:
    parent = mkdir(tmp_path / "open", 0o777)
    d = mkdir(Path(parent) / "d", 0o700)
    problem = shm_dir_problem(d)
    assert problem is not None and f"inside {parent!r}" in problem


@root_only
def test_owned_by_another_user(tmp_path: Path) -> None:
    d = mkdir(tmp_path / "d", 0o755)
    os.chown(d, NOBODY, NOBODY)
    problem = shm_dir_problem(d)
    assert problem is not None and f"owned by {user_text(NOBODY)}" in problem


@root_only
def test_a_symlink_of_another_user(tmp_path: Path) -> None:
    real = mkdir(tmp_path / "real", 0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    os.lchown(link, NOBODY, NOBODY)
    problem = shm_dir_problem(str(link))
    assert problem is not None and "symlink" in problem and user_text(NOBODY) in problem
    # on the way to it, too
    d = mkdir(Path(real) / "d", 0o700)
    problem = shm_dir_problem(str(link / "d"))
    assert problem is not None and f"symlink {str(link)!r}" in problem
    assert shm_dir_problem(d) is None  # the real path is fine


def test_the_layer_refuses_an_unsafe_shm_dir_at_construction(tmp_path: Path) -> None:
    d = mkdir(tmp_path / "d", 0o777)
    with pytest.raises(ValueError, match=r"CONFIG\['shm_dir'\].*without the sticky bit") as info:
        HybridChannelLayer(prefix="tunsafe", host_id="h", shm_dir=d)
    assert d in str(info.value)


def test_owner_texts(tmp_path: Path) -> None:
    me = os.geteuid()
    assert user_text(me) == f"uid {me} ({pwd.getpwuid(me).pw_name})"
    unknown = 4_000_000_000
    assert user_text(unknown) == f"uid {unknown}"
    link = tmp_path / "l"
    link.symlink_to("/etc/passwd")
    assert describe(str(link)).startswith("a symlink to '/etc/passwd' owned by uid")
    assert describe(str(tmp_path / "gone")) == "nothing (it vanished)"
    err = taken("lock file", str(link), "open failed: Too many levels of symbolic links")
    assert isinstance(err, NamespaceTaken) and isinstance(err, PermissionError)
    text = str(err)
    assert str(link) in text and user_text(me) in text and "CONFIG['prefix']" in text
