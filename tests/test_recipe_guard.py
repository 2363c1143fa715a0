"""A hostile or careless recipe, through the real command line: templates cannot run
code or read files, package names cannot become options, recipe files cannot be
read from outside the recipes directory, a binary file is copied as it is, and
one bad recipe does not hide the others from `vztt list`.

No root, no network: `vztt list` and `vztt show` only load recipes.
"""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest

from conftest import Result, one_line_error, run_vztt
from vztt.base.errors import RecipeError
from vztt.recipe.recipe import RecipeStore

EXIT_RECIPE = 3
GOOD = """\
distro = "debian"
release = "bookworm"
version = "12"
summary = "good one"
[packages]
include = ["openssh-server", "libc6:amd64", "g++"]
[[repositories]]
name = "main"
url = "$DEBIAN_MIRROR"
suite = "{{ release }}"
keyring = "k.gpg"
"""


@pytest.fixture
def recipes(tmp_path: Path) -> Path:
    d = tmp_path / "recipes"
    (d / "keys").mkdir(parents=True)
    (d / "keys" / "k.gpg").write_bytes(b"key")
    (d / "files").mkdir()
    (d / "good.toml").write_text(GOOD)
    return d


def vztt(recipes: Path, *args: str) -> Result:
    return run_vztt(*args, recipes=recipes, cache=recipes.parent / "cache", timeout=60)


def bad(recipes: Path, extra: str, name: str = "bad") -> str:
    (recipes / f"{name}.toml").write_text(GOOD + textwrap.dedent(extra))
    return name


def refused(r: Result, *words: str) -> str:
    assert r.returncode == EXIT_RECIPE, f"exit {r.returncode}:\n{r.stdout}\n{r.stderr}"
    line = one_line_error(r)
    assert line.startswith("vztt: recipe error: "), line
    for w in words:
        assert w in line, line
    return line


# -- templates run sandboxed -------------------------------------------------------------------

PAYLOADS = {
    "cycler-popen": "{{ cycler.__init__.__globals__.os.popen('touch MARKER').read() }}",
    "lipsum-globals": "{{ lipsum.__globals__['os'].popen('touch MARKER').read() }}",
    "lipsum-shadow": "{{ lipsum.__globals__.__builtins__.open('/etc/shadow').read() }}",
    "attribute-escape": "{{ summary.__class__.__mro__[1].__subclasses__() }}",
    "format-escape": "{{ '{0.__class__.__init__.__globals__}'.format(name) }}",
}


@pytest.mark.parametrize("payload", sorted(PAYLOADS))
@pytest.mark.parametrize("command", ["list", "show"])
def test_templates_cannot_run_code_or_read_files(recipes: Path, tmp_path: Path, payload: str, command: str) -> None:
    marker = tmp_path / "ran"
    text = PAYLOADS[payload].replace("MARKER", str(marker))
    (recipes / "bad.toml").write_text(GOOD.replace('"good one"', json.dumps(text)))     # the summary
    r = vztt(recipes, *(["list"] if command == "list" else ["show", "bad", "--json"]))
    refused(r, "bad.toml", "summary")
    assert not marker.exists(), f"the template ran code: {payload}"
    shadow = Path("/etc/shadow").read_text() if os.access("/etc/shadow", os.R_OK) else "root:"
    assert shadow.splitlines()[0] not in r.stdout + r.stderr
    if command == "list":                         # the good recipe is still listed
        assert [row.split()[0] for row in r.stdout.splitlines()[1:]] == ["bad", "good"], r.stdout


@pytest.mark.parametrize("statement", ['{% include "good.toml" %}', '{% import "good.toml" as g %}',
                                       '{% extends "good.toml" %}', '{% from "x" import y %}'])
def test_template_statements_that_read_files_are_refused(recipes: Path, statement: str) -> None:
    bad(recipes, f'[[files]]\npath = "/etc/motd"\ntemplate = {json.dumps(statement)}\n')
    word = statement.split()[1]
    refused(vztt(recipes, "show", "bad"), "bad.toml", "files[/etc/motd].template", f"{{% {word}")


def test_templates_still_render_the_recipe_variables(recipes: Path) -> None:
    bad(recipes, '[variables]\nwho = "world"\n[[files]]\npath = "/etc/motd"\n'
                 'template = "{{ who|upper }} {{ name }} {% for c in release %}{{ c }}{% endfor %}"\n')
    r = vztt(recipes, "show", "bad", "--json")
    assert r.returncode == 0, r.stderr
    assert RecipeStore(recipes).load("bad").files[0].content == b"WORLD bad bookworm"


# -- package names ---------------------------------------------------------------------------

def test_apt_package_names_follow_debian_policy(recipes: Path) -> None:
    for key, name in [("include", "--reinstall"), ("exclude", "-f"), ("include", "Upper"), ("include", "a"),
                      ("include", "vim; rm -rf /"), ("include", "-oAPT::Architecture=i386")]:
        text = GOOD.replace('include = ["openssh-server", "libc6:amd64", "g++"]', f"{key} = {json.dumps([name])}")
        (recipes / "bad.toml").write_text(text)
        with pytest.raises(RecipeError, match=rf"bad\.toml: packages\.{key}: .* is not a package name \(Debian"):
            RecipeStore(recipes).load("bad")
    # The one a user sees for the last: an option for apt, refused at load.
    refused(vztt(recipes, "show", "bad"), "bad.toml", "packages.include", "'-oAPT::Architecture=i386'", "Debian")


EL = """\
distro = "rockylinux"
release = "9"
version = "9"
[packages]
base = BASE
[[repositories]]
name = "baseos"
url = "$ROCKY_MIRROR/9/BaseOS/x86_64/os"
keyring = "k.gpg"
"""


def test_dnf_specs_follow_dnf(recipes: Path) -> None:
    fine = ["system-release", "glibc-minimal-langpack", "@core", "@^minimal-environment", "/usr/bin/sh",
            "perl(File::Temp)", "system-release(releasever) = 9", "kernel-core-5.14.0", "python3.11",
            "vim-*", "libstdc++"]
    (recipes / "el.toml").write_text(EL.replace("BASE", json.dumps(fine)))
    r = vztt(recipes, "show", "el", "--json")
    assert r.returncode == 0, r.stderr
    assert r.json()["settings"]["packages.base"] == fine
    for name in ("-x", "--setopt=reposdir=/tmp", "@-x", " bash", "bash\n"):
        (recipes / "el.toml").write_text(EL.replace("BASE", json.dumps([name])))
        with pytest.raises(RecipeError, match=r"el\.toml: packages\.base: .* is not a package name \(dnf"):
            RecipeStore(recipes).load("el")
    refused(vztt(recipes, "show", "el"), "el.toml", "packages.base", repr("bash\n"), "dnf")


# -- files a recipe reads ----------------------------------------------------------------------

def test_sources_must_stay_in_the_recipes_directory(recipes: Path, tmp_path: Path) -> None:
    outside = tmp_path / "secret"
    outside.write_text("secret\n")
    (recipes / "files" / "link-out").symlink_to(outside)
    (recipes / "files" / "link-in").symlink_to("../keys/k.gpg")          # a link that stays inside is fine
    for ref in ("/etc/shadow", "/proc/self/environ", "../secret", "files/link-out", str(outside)):
        for key, extra in (("files[/etc/x].source", f'[[files]]\npath = "/etc/x"\nsource = {json.dumps(ref)}\n'),
                           ("hooks[h].script", f'[[hooks]]\nname = "h"\nscript = {json.dumps(ref)}\n')):
            bad(recipes, extra)
            with pytest.raises(RecipeError, match="outside the recipes directory") as e:
                RecipeStore(recipes).load("bad")
            assert f"bad.toml: {key}: " in str(e.value) and "secret\n" not in str(e.value)
    line = refused(vztt(recipes, "show", "bad"), "bad.toml", "hooks[h].script", "outside the recipes directory")
    assert str(outside) in line
    bad(recipes, '[[files]]\npath = "/etc/x"\nsource = "files/link-in"\n')
    assert vztt(recipes, "show", "bad").returncode == 0
    os.mkfifo(recipes / "files" / "fifo")
    bad(recipes, '[[files]]\npath = "/etc/x"\nsource = "files/fifo"\n')
    refused(vztt(recipes, "show", "bad"), "files/fifo", "not a regular file")


def test_a_binary_source_is_copied_as_bytes(recipes: Path) -> None:
    blob = bytes(range(256)) * 4
    (recipes / "files" / "blob.bin").write_bytes(blob)
    (recipes / "files" / "bad.j2").write_bytes(b"\xff\xfe{{ name }}\n")
    bad(recipes, '[[files]]\npath = "/usr/share/blob.bin"\nsource = "files/blob.bin"\nmode = "0600"\n')
    r = vztt(recipes, "show", "bad")
    assert r.returncode == 0, r.stderr
    spec = RecipeStore(recipes).load("bad").files[0]
    assert spec.content == blob and spec.mode == 0o600
    bad(recipes, '[[files]]\npath = "/etc/x"\nsource = "files/bad.j2"\n')
    refused(vztt(recipes, "show", "bad"), "files/bad.j2", "not UTF-8 text")


# -- one bad recipe among good ones ---------------------------------------------------------------

def test_list_marks_the_invalid_recipe_and_lists_the_others(recipes: Path) -> None:
    (recipes / "broken.toml").write_text('distro = "debian"\nrelease = \n')        # not TOML
    bad(recipes, '[[smoke]]\nname = "s"\ncommand = "true"\nexit_status = "0"\n', name="wrong")
    r = vztt(recipes, "list")
    assert r.returncode == EXIT_RECIPE, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:3] == ["NAME", "ARCH", "STATE"], r.stdout
    rows = {line.split()[0]: tuple(line.split()[1:3]) for line in lines[1:]}
    assert rows == {"broken": ("-", "invalid"), "good": ("x86_64", "-"), "wrong": ("-", "invalid")}, r.stdout
    errors = [l for l in r.stderr.splitlines() if l.startswith("vztt: recipe error: ")]
    assert len(errors) == 2 and "Traceback" not in r.stderr
    r = vztt(recipes, "list", "--json")
    assert r.returncode == EXIT_RECIPE
    doc = {row["name"]: row for row in r.json()}
    assert "error" not in doc["good"] and doc["good"]["summary"] == "good one"
    assert doc["wrong"]["error"]["kind"] == "recipe" and doc["wrong"]["error"]["exit_code"] == EXIT_RECIPE
    assert "smoke[s].exit_status" in doc["wrong"]["error"]["message"]
    assert "invalid TOML" in doc["broken"]["error"]["message"]
