"""Recipes: parsing, inheritance, templating, and every error a maintainer can make."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import pytest

from conftest import RECIPES, REPO, one_line_error, run_vztt
from vztt.base.errors import RecipeError
from vztt.recipe.recipe import RecipeStore
from vztt.recipe.settings import SETTINGS, reference_markdown


def write(d: Path, name: str, text: str) -> Path:
    p = d / f"{name}.toml"
    p.write_text(textwrap.dedent(text))
    return p


@pytest.fixture
def store(tmp_path: Path) -> RecipeStore:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "k.gpg").write_bytes(b"key")
    write(tmp_path, "base", """
        abstract = true
        distro = "debian"
        summary = "{{ distro }} {{ version }}"
        [packages]
        include = ["pa", "pb"]
        [[repositories]]
        name = "main"
        url = "$DEBIAN_MIRROR"
        suite = "{{ release }}"
        keyring = "k.gpg"
        [[repositories]]
        name = "extra"
        url = "$EXTRA_MIRROR"
        suite = "{{ release }}-extra"
        keyring = "k.gpg"
        [[files]]
        path = "/etc/motd"
        template = "welcome to {{ name }} ({{ greeting }})\\n"
        [variables]
        greeting = "hello"
        [environment]
        A = "1"
        [[smoke]]
        name = "version"
        command = "cat /etc/debian_version"
        output = "^{{ version }}"
        """)
    write(tmp_path, "leaf", """
        extends = "base"
        release = "bookworm"
        version = "12"
        [packages]
        include = ["pc", "pa"]
        exclude = ["px"]
        [[repositories]]
        name = "extra"
        enabled = false
        [[files]]
        path = "/etc/issue"
        content = "literal {{ not templated }}"
        mode = "0600"
        [environment]
        B = "2"
        """)
    return RecipeStore(tmp_path)


def test_inheritance_merges_as_the_table_says(store: RecipeStore) -> None:
    r = store.load("leaf")
    assert r.distro == "debian" and r.release == "bookworm" and r.version == "12"
    assert r.include == ("pa", "pb", "pc")                      # appended, no duplicates
    assert r.exclude == ("px",)
    assert [x.name for x in r.repositories] == ["main"]     # the child disabled "extra"
    assert r.repositories[0].suite == "bookworm"            # templated after merging
    assert r.repositories[0].url == "$DEBIAN_MIRROR"        # mirrors are expanded later, not here
    assert r.environment == {"A": "1", "B": "2"}
    assert r.summary == "debian 12"
    files = {f.path: f for f in r.files}
    assert files["/etc/motd"].content == b"welcome to leaf (hello)\n"
    assert files["/etc/issue"].content == b"literal {{ not templated }}"
    assert files["/etc/issue"].mode == 0o600
    assert r.smoke[0].output == "^12"
    assert r.origins["release"].name == "leaf.toml" and r.origins["distro"].name == "base.toml"
    assert [p.name for p in r.chain] == ["leaf.toml", "base.toml"]


def test_digest_follows_content(store: RecipeStore, tmp_path: Path) -> None:
    d1 = store.load("leaf").digest()
    assert store.load("leaf").digest() == d1
    (tmp_path / "leaf.toml").write_text((tmp_path / "leaf.toml").read_text().replace('"2"', '"3"'))
    assert store.load("leaf").digest() != d1
    (tmp_path / "keys" / "k.gpg").write_bytes(b"another key")   # a new keyring is a new recipe
    d3 = store.load("leaf").digest()
    (tmp_path / "keys" / "k.gpg").write_bytes(b"key")
    assert store.load("leaf").digest() != d3


def test_abstract_recipes_are_not_listed_or_built(store: RecipeStore) -> None:
    assert store.names() == ["leaf"]
    with pytest.raises(RecipeError, match="abstract"):
        store.load("base")


ERRORS = [
    ("unknown key", 'extends = "base"\nrelease = "x"\nversion = "1"\nflavour = "x"\n', r"bad\.toml: flavour: unknown key"),
    ("unknown nested key", 'extends = "base"\nrelease = "x"\nversion = "1"\n[packages]\ninclud = ["a"]\n',
     r"bad\.toml: packages\.includ: unknown key"),
    ("wrong type", 'extends = "base"\nrelease = "x"\nversion = "1"\n[packages]\ninclude = "vim"\n',
     r"bad\.toml: packages\.include: expected list\[str\], got str"),
    ("wrong type in record", 'extends = "base"\nrelease = "x"\nversion = "1"\n[[smoke]]\nname = "s"\ncommand = "true"\nexit_status = "0"\n',
     r"bad\.toml: smoke\[s\]\.exit_status: expected int"),
    ("bad choice", 'extends = "base"\nrelease = "x"\nversion = "1"\narch = "sparc"\n', r"bad\.toml: arch: 'sparc' is not one of"),
    ("bad osrelease", 'extends = "base"\nrelease = "x"\nversion = "1"\nosrelease = "2.6.32; reboot"\n',
     r"bad\.toml: osrelease: '2\.6\.32; reboot' is not valid: 1 to 64 letters, digits"),
    ("missing parent", 'extends = "nope"\n', r"bad\.toml: extends: parent recipe 'nope' not found"),
    ("file outside the image", 'extends = "base"\nrelease = "x"\nversion = "1"\n[[files]]\npath = "/etc/../../x"\ncontent = ""\n',
     r"bad\.toml: files\[/etc/\.\./\.\./x\]\.path: .* is outside the image"),
    ("relative file path", 'extends = "base"\nrelease = "x"\nversion = "1"\n[[files]]\npath = "etc/x"\ncontent = ""\n',
     r"files\[etc/x\]\.path: .* is outside the image"),
    ("file with two sources", 'extends = "base"\nrelease = "x"\nversion = "1"\n[[files]]\npath = "/x"\ncontent = ""\ntemplate = ""\n',
     r"files\[/x\]: exactly one of content, template, source"),
    ("missing keyring", 'extends = "base"\nrelease = "x"\nversion = "1"\n[[repositories]]\nname = "n"\nurl = "$M"\nsuite = "s"\nkeyring = "none.gpg"\n',
     r"bad\.toml: repositories\[n\]\.keyring: no such keyring"),
    ("undefined template variable", 'extends = "base"\nrelease = "x"\nversion = "1"\n[[files]]\npath = "/x"\ntemplate = "{{ nosuch }}"\n',
     r"files\[/x\]\.template: template error: 'nosuch' is undefined"),
    ("missing required key", 'extends = "base"\nrelease = "x"\n', r"bad\.toml: version: required"),
    ("record without its key", 'extends = "base"\nrelease = "x"\nversion = "1"\n[[hooks]]\nrun = "true"\n',
     r"bad\.toml: hooks\[0\]: missing `name`"),
    ("bad regex", 'extends = "base"\nrelease = "x"\nversion = "1"\n[[smoke]]\nname = "s"\ncommand = "true"\noutput = "("\n',
     r"smoke\[s\]\.output: bad regular expression"),
    ("invalid TOML", 'extends = "base\n', r"bad\.toml: invalid TOML"),
    ("name differs from file", 'extends = "base"\nrelease = "x"\nversion = "1"\nname = "other"\n', r"name: 'other' differs"),
]


@pytest.mark.parametrize("label,text,message", ERRORS, ids=[e[0] for e in ERRORS])
def test_errors_name_file_and_key(store: RecipeStore, tmp_path: Path, label: str, text: str, message: str) -> None:
    (tmp_path / "bad.toml").write_text(text)
    with pytest.raises(RecipeError, match=message) as e:
        store.load("bad")
    assert "\n" not in str(e.value)


def test_inheritance_cycle(tmp_path: Path) -> None:
    write(tmp_path, "a", 'extends = "b"\n')
    write(tmp_path, "b", 'extends = "c"\n')
    write(tmp_path, "c", 'extends = "a"\n')
    with pytest.raises(RecipeError, match=r"c\.toml: extends: inheritance cycle a -> b -> c -> a"):
        RecipeStore(tmp_path).load("a")


def test_unknown_recipe_lists_known(store: RecipeStore) -> None:
    with pytest.raises(RecipeError, match=r"nope: no such recipe .* \(known: leaf\)"):
        store.load("nope")


def test_shipped_recipes_load_and_differ_by_a_few_lines() -> None:
    store = RecipeStore(RECIPES)
    names = store.names()
    for n in ("debian-12-x86_64-minimal", "debian-13-x86_64-minimal",
              "ubuntu-22.04-x86_64-minimal", "ubuntu-24.04-x86_64-minimal"):
        assert n in names
        r = store.load(n)
        assert r.repositories and all(x.keyring.is_file() for x in r.repositories)
        assert {"openssh-server", "systemd-sysv", "iproute2", "ca-certificates", "less", "vim-tiny"} <= set(r.include)
    d12, d13 = store.load("debian-12-x86_64-minimal"), store.load("debian-13-x86_64-minimal")
    assert d12.repositories[0].suite == "bookworm" and d13.repositories[0].suite == "trixie"
    assert "ifupdown" in d12.include and "netplan.io" in store.load("ubuntu-24.04-x86_64-minimal").include
    assert len(store.path_of("debian-13-x86_64-minimal").read_text().splitlines()) <= 5


def test_no_registry_host_in_the_repository() -> None:
    """Mirrors are variables: no tracked file names Debian's, Ubuntu's or PyPI's hosts."""
    import subprocess
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    # Written backwards, so that this test does not name them either.
    hosts = tuple(h[::-1] for h in ('gro.naibed.bed', 'gro.naibed.ptf', 'gro.naibed.ytiruces', 'moc.utnubu.evihcra', 'moc.utnubu.ytiruces', 'gro.ipyp', 'gro.detsohnohtyp.selif'))
    for f in files:
        p = REPO / f
        if p.is_file() and p.suffix not in (".gpg",):
            text = p.read_text(errors="replace")
            for h in hosts:
                assert h not in text, f"{f} names {h}"


def test_reference_doc_is_generated_from_the_table() -> None:
    doc = (REPO / "docs" / "recipes.md").read_text()
    assert doc == reference_markdown(), "docs/recipes.md is stale: run `make docs`"
    for s in SETTINGS:
        assert f"`{s.key}`" in doc


def test_cli_show_and_list(tmp_path: Path, store: RecipeStore) -> None:
    r = run_vztt("show", "leaf", "--json", recipes=store.directory, cache=tmp_path / "c")
    assert r.returncode == 0, r.stderr
    doc = r.json()
    assert doc["settings"]["packages.include"] == ["pa", "pb", "pc"]
    assert doc["origins"]["release"].endswith("leaf.toml")
    r = run_vztt("list", "--json", recipes=store.directory, cache=tmp_path / "c")
    assert [x["name"] for x in r.json()] == ["leaf"] and r.json()[0]["cached"] is False
    (store.directory / "leaf.toml").write_text('extends = "base"\nrelease = 5\n')
    r = run_vztt("show", "leaf", recipes=store.directory, cache=tmp_path / "c")
    assert r.returncode == 3
    assert "leaf.toml: release: expected str, got int" in one_line_error(r)


def test_copy_of_shipped_recipes_is_self_contained(tmp_path: Path) -> None:
    """Keyrings and files are found relative to the recipes directory, wherever it is."""
    shutil.copytree(RECIPES, tmp_path / "r")
    r = RecipeStore(tmp_path / "r").load("debian-12-x86_64-minimal")
    assert all(str(x.keyring).startswith(str(tmp_path)) for x in r.repositories)
