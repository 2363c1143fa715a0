"""Mirror variables: host apt defaults, files, environment, command line."""

from __future__ import annotations

from pathlib import Path

import pytest

from vztt.base.errors import RecipeError
from vztt.recipe.variables import host_defaults, load


def apt_etc(tmp_path: Path) -> Path:
    etc = tmp_path / "apt"
    (etc / "sources.list.d").mkdir(parents=True)
    (etc / "sources.list").write_text(
        "# comment\n"
        "deb-src http://src.example/debian bookworm main\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://one.example/debian/ bookworm main\n")
    (etc / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://two.example/debian\nSuites: bookworm\nComponents: main\n\n"
        "Types: deb\nURIs: http://sec.example/debian-security\nSuites: bookworm-security\nComponents: main\n\n"
        "Types: deb\nEnabled: no\nURIs: http://off.example/ubuntu\nSuites: jammy\n")
    (etc / "sources.list.d" / "other.list").write_text("deb http://mirror.example/ubuntu jammy main\n")
    (etc / "sources.list.d" / "ignored.save").write_text("deb http://no.example/debian bookworm main\n")
    return etc


def test_host_defaults_from_both_source_formats(tmp_path: Path) -> None:
    found = host_defaults(apt_etc(tmp_path))
    assert found == {
        "DEBIAN_MIRROR": "http://one.example/debian",          # sources.list comes first, like apt
        "DEBIAN_SECURITY_MIRROR": "http://sec.example/debian-security",
        "UBUNTU_MIRROR": "http://mirror.example/ubuntu",       # the disabled stanza is skipped
    }


def test_precedence(tmp_path: Path) -> None:
    system = tmp_path / "system.toml"
    user = tmp_path / "user.toml"
    system.write_text('DEBIAN_MIRROR = "http://system.example/debian"\nCENTOS_MIRROR = "http://system.example/centos"\n')
    user.write_text('CENTOS_MIRROR = "file:///srv/centos"\n')
    m = load(cli=["UBUNTU_MIRROR=http://cli.example/ubuntu"], environ={"VZTT_MIRROR_CENTOS_MIRROR": "http://env.example/c/"},
             system_file=system, user_file=user, apt_etc=apt_etc(tmp_path))
    assert m.values["DEBIAN_MIRROR"] == "http://system.example/debian"
    assert m.values["CENTOS_MIRROR"] == "http://env.example/c"     # env beats files; trailing / dropped
    assert m.values["UBUNTU_MIRROR"] == "http://cli.example/ubuntu"
    assert m.origin["DEBIAN_MIRROR"] == str(system)
    assert m.expand("${DEBIAN_MIRROR}/x $CENTOS_MIRROR", "w") == "http://system.example/debian/x http://env.example/c"


def test_unset_variable_is_one_clear_line(tmp_path: Path) -> None:
    m = load(environ={}, system_file=tmp_path / "none", user_file=tmp_path / "none", apt_etc=tmp_path)
    with pytest.raises(RecipeError, match=r"r\.toml: repositories\[main\]\.url: mirror variable \$ROCKY_MIRROR is not set .*VZTT_MIRROR_ROCKY_MIRROR"):
        m.expand("$ROCKY_MIRROR/9", "r.toml: repositories[main].url")


@pytest.mark.parametrize("text,message", [
    ('DEBIAN_MIRROR = 3\n', r"m\.toml: DEBIAN_MIRROR: expected a URL string"),
    ('debian = "http://x.example/"\n', r"m\.toml: debian: mirror names are upper case"),
    ('DEBIAN_MIRROR = "ftp://x.example/"\n', r"m\.toml: DEBIAN_MIRROR: 'ftp://x.example/' is not an http"),
    ('DEBIAN_MIRROR = "http://x\n', r"m\.toml: invalid TOML"),
])
def test_bad_mirrors_file(tmp_path: Path, text: str, message: str) -> None:
    f = tmp_path / "m.toml"
    f.write_text(text)
    with pytest.raises(RecipeError, match=message):
        load(environ={}, system_file=f, user_file=tmp_path / "none", apt_etc=tmp_path)


def test_bad_cli_mirror(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="--mirror oops: expected NAME=URL"):
        load(cli=["oops"], environ={}, system_file=tmp_path / "x", user_file=tmp_path / "x", apt_etc=tmp_path)


def test_fallback_when_a_variable_is_not_set(tmp_path: Path) -> None:
    """`${NAME:-FALLBACK}`: a repository's image_url ships NAME when set, else the build's URL."""
    m = load(environ={"VZTT_MIRROR_DEBIAN_MIRROR": "file:///srv/debian"}, system_file=tmp_path / "none",
             user_file=tmp_path / "none", apt_etc=tmp_path)
    shipped = "${DEBIAN_MIRROR_PUBLIC:-$DEBIAN_MIRROR}"
    assert m.expand(shipped + "/x", "w") == "file:///srv/debian/x"
    m.set("DEBIAN_MIRROR_PUBLIC", "http://public.example/debian/", "test")
    assert m.expand(shipped + "/x", "w") == "http://public.example/debian/x"
    with pytest.raises(RecipeError, match=r"\$NOWHERE is not set"):
        m.expand("${UNSET_ONE:-$NOWHERE}", "w")


def test_a_child_that_moves_a_repository_ships_its_own_url(tmp_path: Path) -> None:
    """A child recipe that sets a repository's url without image_url does not ship the parent's image_url."""
    from vztt.recipe.recipe import RecipeStore
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "k.gpg").write_bytes(b"key")
    (tmp_path / "base.toml").write_text('abstract = true\ndistro = "debian"\n[[repositories]]\nname = "main"\n'
                                        'url = "$DEBIAN_MIRROR"\nimage_url = "${DEBIAN_MIRROR_PUBLIC:-$DEBIAN_MIRROR}"\n'
                                        'suite = "bookworm"\nkeyring = "k.gpg"\n')
    (tmp_path / "same.toml").write_text('extends = "base"\nrelease = "bookworm"\nversion = "12"\n')
    (tmp_path / "moved.toml").write_text('extends = "base"\nrelease = "bookworm"\nversion = "12"\n'
                                         '[[repositories]]\nname = "main"\nurl = "$MY_MIRROR"\n')
    store = RecipeStore(tmp_path)
    assert store.load("same").repositories[0].image_url == "${DEBIAN_MIRROR_PUBLIC:-$DEBIAN_MIRROR}"
    assert store.load("moved").repositories[0].image_url == ""
    # image_url is not a solver input: the lock of `same` stays valid whatever it ships
    assert store.load("same").resolve_digest() != store.load("moved").resolve_digest()
    text = (tmp_path / "same.toml").read_text()
    before = store.load("same").resolve_digest()
    (tmp_path / "same.toml").write_text(text + '[[repositories]]\nname = "main"\nimage_url = "http://x.example/d"\n')
    assert store.load("same").resolve_digest() == before
