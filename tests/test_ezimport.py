"""`vztt import-ez`: EZ template trees (installed, and source trees with a spec)
into recipes, what each file became, what was not imported, and bad input.

The build half (real apt, a local signed repository of the real Debian 12
packages plus synthetic ones) lives in tests/test_ezbuild.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import tomllib
from pathlib import Path

import pytest
import yaml

from conftest import RECIPES, one_line_error, run_vztt
from eztree import APP_FILES, OS_FILES, installed_tree, source_tree
from vztt.formats.ploop.cache import app_cache_name
from vztt.nightly import dependency_order, groups, matrix, shard
from vztt.recipe.recipe import RecipeStore

EXIT_RECIPE = 3
OS = "debian-12-x86_64"


def imported(tmp_path: Path, source: Path, *args: str) -> tuple[dict, Path]:
    to = tmp_path / "recipes"
    r = run_vztt("import-ez", source, "--to", to, "--json", *args, cache=tmp_path / "cache")
    assert r.returncode == 0, r.stderr
    return r.json(), to


def recipe(to: Path, name: str) -> dict:
    return tomllib.loads((to / f"{name}.toml").read_text())


def rows(doc: dict, template: str, key: str) -> dict[str, str]:
    t = next(t for t in doc["templates"] if t["template"] == template)
    return {r["file"]: r["detail"] for r in t[key]}


def test_installed_tree_becomes_recipes(tmp_path: Path) -> None:
    config = installed_tree(tmp_path / "ez")
    doc, to = imported(tmp_path, config)
    assert sorted(p.name for p in to.glob("*.toml")) == [f"{OS}-hello.toml", f"{OS}-tools.toml", f"{OS}.toml"]

    os_recipe = recipe(to, OS)
    assert (os_recipe["distro"], os_recipe["release"], os_recipe["version"], os_recipe["arch"]) == \
        ("debian", "bookworm", "12", "x86_64")
    assert os_recipe["summary"] == "Debian 12 (EZ test template)"
    assert os_recipe["packages"] == {"priority": "essential", "include": ["systemd-sysv", "iproute2", "ez-marker"]}
    assert os_recipe["environment"] == {"EZ_GREETING": "hello from the EZ environment", "LANG": "C.UTF-8"}
    [repo] = os_recipe["repositories"]
    assert repo == {"name": "main", "url": "$DEBIAN_MIRROR", "suite": "bookworm", "components": ["main"],
                    "keyring": "debian-archive-keyring.gpg"}
    # vztt's order: pre-cache (host, empty root), mid-pre-install (after the base system), post-install
    assert [(h["name"], h["where"], h["phase"], h["convention"]) for h in os_recipe["hooks"]] == [
        ("pre-cache", "host", "before-packages", "ez"), ("mid-pre-install", "image", "after-base", "ez"),
        ("post-install", "image", "after-packages", "ez")]
    for h in os_recipe["hooks"]:                       # kept beside the recipe, unchanged, executable
        script = to / h["script"]
        assert script.read_text() == OS_FILES[h["name"]] and os.access(script, os.X_OK)
    # the signing key the recipe names, from vztt's own recipes/keys
    assert (to / "keys" / "debian-archive-keyring.gpg").read_bytes() == \
        (RECIPES / "keys" / "debian-archive-keyring.gpg").read_bytes()

    hello = recipe(to, f"{OS}-hello")
    assert hello["base"] == OS and hello["app_templates"] == ["hello"]
    assert hello["packages"] == {"include": ["ez-hello"]}
    assert hello["environment"] == {"APP_CACHE": "1"}             # as `vzpkg create appcache`
    assert [(h["name"], h["phase"]) for h in hello["hooks"]] == [("hello-post-install", "after-packages")]
    # tools has no post-install: vztt runs the OS template's in its place
    tools = recipe(to, f"{OS}-tools")
    assert [h["name"] for h in tools["hooks"]] == ["tools-post-install"]
    assert (to / tools["hooks"][0]["script"]).read_text() == OS_FILES["post-install"]
    assert "falls back" in rows(doc, "app/tools/default", "mapped")["post-install"]

    # what was not imported is said, and kept as a comment in the recipe
    assert "virtual machine" in rows(doc, "os/default", "not_imported")["ct2vm"]
    assert "Virtuozzo host" in rows(doc, "app/tools/default", "not_imported")["pre-install-hn"]
    assert "ct2vm: converts a container" in (to / f"{OS}.toml").read_text()
    assert "#   pre-install-hn: runs on the Virtuozzo host" in (to / f"{OS}-tools.toml").read_text()
    assert "upgradable_versions" not in rows(doc, "os/default", "not_imported")      # empty: nothing lost
    mapped = rows(doc, "os/default", "mapped")
    assert mapped["repositories:2"] == "repositories[main] $DEBIAN_MIRROR bookworm main"
    assert set(mapped) >= {"packages", "environment", "summary", "description", "pre-cache", "post-install"}

    # they load as vztt loads them: the layer on its base, the text output says the same
    shown = run_vztt("show", f"{OS}-hello", "--json", recipes=to, cache=tmp_path / "cache")
    assert shown.returncode == 0, shown.stderr
    text = run_vztt("import-ez", config, "--to", tmp_path / "again", cache=tmp_path / "cache")
    assert text.returncode == 0, text.stderr
    assert "  NOT       ct2vm" in text.stdout and f"{OS}-hello <- {config}/app/hello/default" in text.stdout


def test_source_tree_with_a_spec(tmp_path: Path) -> None:
    src = source_tree(tmp_path / "debian-12-x86_64-ez")
    doc, to = imported(tmp_path, src, "--name", "deb12")
    assert sorted(p.name for p in to.glob("*.toml")) == ["deb12-hello.toml", "deb12-tools.toml", "deb12.toml"]
    os_recipe = recipe(to, "deb12")
    # summary and package_manager come from the spec's echo lines, with its macros expanded
    assert os_recipe["summary"] == "Debian 12 (x86_64) Virtuozzo Template"
    assert recipe(to, "deb12-hello")["summary"] == "hello for Debian 12 (x86_64) Virtuozzo Template"
    assert [h["name"] for h in os_recipe["hooks"]] == ["pre-cache", "mid-pre-install", "post-install"]
    # scripts are executable because the spec installs them 0755, whatever their mode in the tree
    assert all(os.access(to / h["script"], os.X_OK) for h in os_recipe["hooks"])
    skipped = {Path(s["file"]).name: s["detail"] for s in doc["skipped"]}
    assert "os_notes" in skipped and "does not install" in skipped["os_notes"]
    assert "release" in rows(doc, "os/default", "not_imported")


def test_appcache_name_is_vztts() -> None:
    """src/appcache.c: <os>_app_ + md5 of the sorted names, each after five spaces, one per line."""
    listing = b"     mysql\n     php\n"
    assert app_cache_name("centos-7-x86_64", ["php", "mysql"]) == \
        "centos-7-x86_64_app_" + hashlib.md5(listing).hexdigest()


def test_layers_go_with_their_bases() -> None:
    base_of = {"d12-nginx": "d12", "d12-pg": "d12", "d12-nginx-tls": "d12-nginx"}
    names = ["d12-nginx-tls", "u24", "d12-pg", "d12-nginx", "d12", "a1"]
    assert dependency_order(names, base_of) == ["a1", "d12", "d12-nginx", "d12-nginx-tls", "d12-pg", "u24"]
    assert groups(names, base_of) == [["a1"], ["d12", "d12-nginx", "d12-nginx-tls", "d12-pg"], ["u24"]]
    # a shard takes a base with its layers
    assert sorted(shard(names, "2/3", base_of)) == ["d12", "d12-nginx", "d12-nginx-tls", "d12-pg"]
    gh = json.loads(matrix(names, "github", base_of))
    assert [e["template"] for e in gh["include"]] == ["a1", "d12", "u24"]
    assert [e["layers"] for e in gh["include"]] == ["", "d12-nginx d12-nginx-tls d12-pg", ""]
    inc = gh["include"][1]
    assert (inc["template"], inc["layers"]) == ("d12", "d12-nginx d12-nginx-tls d12-pg")
    # the base's job carries its layers' files too: caches, test reports, templates
    for layer in ("d12-nginx", "d12-nginx-tls", "d12-pg"):
        assert f"cache/locks/{layer}.lock.json" in inc["cache_vztt_template"].split("\n")
        assert f"junit-{layer}.xml" in inc["artifact_junit"].split("\n")
        assert f"cache/{layer}.plain.tar.lz4" in inc["artifact_template"].split("\n")
    child = yaml.safe_load(matrix(names, "gitlab", base_of))
    assert child["update: d12"]["variables"] == {"TEMPLATE": "d12", "LAYERS": "d12-nginx d12-nginx-tls d12-pg"}
    assert any("$VZTT update $TEMPLATE $LAYERS" in line for line in child["update: d12"]["script"])
    assert not any(k.startswith("update: d12-") for k in child)       # the layers ride in their base's job
    assert json.loads(matrix(names, "json", base_of))[:3] == ["a1", "d12", "d12-nginx"]
    # a layer whose base is not among the names goes on its own
    assert groups(["d12-nginx"], base_of) == [["d12-nginx"]]


def test_shipped_layers_load(tmp_path: Path) -> None:
    for layer, extra in (("debian-12-x86_64-nginx", "nginx-page"), ("debian-12-x86_64-postgresql", "psql-select-1")):
        r = run_vztt("show", layer, "--json", cache=tmp_path)
        assert r.returncode == 0, r.stderr
        settings = r.json()["settings"]
        assert settings["base"] == "debian-12-x86_64-minimal"
        # the boot test runs the base's checks and the layer's
        assert [s["name"] for s in settings["smoke"]][-1] == extra and len(settings["smoke"]) > 1


# --------------------------------------------------------------------------
# Bad input: one line naming the file (and line), nothing written
# --------------------------------------------------------------------------

def _tree_with(tmp_path: Path, change: dict[str, str | bytes | None], app: str | None = None) -> Path:
    config = installed_tree(tmp_path / "ez")
    d = config / "os" / "default" if app is None else config / "app" / app / "default"
    for name, text in change.items():
        if text is None:
            (d / name).unlink()
        else:
            (d / name).write_bytes(text.encode() if isinstance(text, str) else text)
    return config


BAD = {
    "no packages": ({"packages": None}, None, "os/default: no `packages` file: not an EZ template"),
    "app without packages": ({"packages": None}, "hello", "app/hello/default: no `packages` file"),
    "script not text": ({"post-install": b"\x7fELF\x02\x01\x00\x00binary"}, None,
                        "os/default/post-install: not a text file"),
    "unknown url.map variable": ({"repositories": "$DEB_SERVER/debian bookworm main\n$FOO_SERVER/x bookworm main\n"},
                                 None, "os/default/repositories:2: unknown url.map variable $FOO_SERVER"),
    "url.map path we have no variable for": ({"repositories": "$DEB_SERVER/debian-ports bookworm main\n"}, None,
                                             "repositories:1: $DEB_SERVER/debian-ports: no mirror variable of ours"),
    "package manager without backend": ({"package_manager": "zypp1x64\n"}, None,
                                        "os/default/package_manager:1: package_manager 'zypp1x64': vztt has no backend"),
    "distribution without backend": ({"distribution": "suse\n"}, None,
                                     "os/default/distribution:1: distribution 'suse': vztt has no backend"),
    "environment line": ({"environment": "LANG=C\nnot an assignment\n"}, None,
                         "os/default/environment:2: expected VAR=value"),
    # recipes take package names only (issue 13): one that apt would read as an option is refused here
    "package name that is an option": ({"packages": "systemd-sysv\n-oAPT::Architecture=i386\n"}, None,
                                       "os/default/packages:2: '-oAPT::Architecture=i386' is not a package name"),
    "app package name": ({"packages": "ez-hello Bad_Name\n"}, "hello",
                         "app/hello/default/packages:1: 'Bad_Name' is not a package name"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, case: str) -> None:
    change, app, message = BAD[case]
    config = _tree_with(tmp_path, change, app)
    to = tmp_path / "recipes"
    r = run_vztt("import-ez", config, "--to", to, cache=tmp_path / "cache")
    assert r.returncode == EXIT_RECIPE, r.stderr
    line = one_line_error(r)
    assert line.startswith("vztt: import error: ") and message in line, line
    assert not to.exists() or list(to.rglob("*")) == []


def test_el_below_9_is_one_line(tmp_path: Path) -> None:
    files = {**OS_FILES, "package_manager": "rpm49x64\n", "distribution": "centos\n",
             "repositories": "$CE_SERVER/centos/7/os/x86_64/\n"}
    config = installed_tree(tmp_path / "ez", os_files=files, apps={}, osname="centos", osver="7")
    r = run_vztt("import-ez", config, "--to", tmp_path / "recipes", cache=tmp_path / "cache")
    assert r.returncode == EXIT_RECIPE
    line = one_line_error(r)
    assert "package_manager:1: centos-stream 7: EL 7" in line and "EL 9 and later" in line, line
    assert not (tmp_path / "recipes").exists()


def test_template_text_is_not_jinja(tmp_path: Path) -> None:
    """Recipe strings are rendered by the sandboxed jinja2 (issue 13): an EZ template's own
    text is written escaped, so it comes back as it was, never evaluated."""
    summary = "Debian {{ 7 * 7 }} {% if true %}x{% endif %} {# c #} {x}"
    config = _tree_with(tmp_path, {"summary": summary + "\n",
                                   "repositories": "$DEB_SERVER/debian bookworm main\n"
                                                   "http://apt.example.invalid/{{6*7}} bookworm main\n"})
    doc, to = imported(tmp_path, config)
    loaded = RecipeStore(to).load(OS)
    assert loaded.summary == summary
    assert loaded.repositories[1].url == "http://apt.example.invalid/{{6*7}}"


def test_host_without_urlmap_variable_is_kept_with_a_warning(tmp_path: Path) -> None:
    config = _tree_with(tmp_path, {"repositories": "$DEB_SERVER/debian bookworm main\n"
                                                   "http://apt.example.invalid/debian bookworm extra\n"})
    doc, to = imported(tmp_path, config)
    warnings = rows(doc, "os/default", "warnings")
    assert "names a host without a url.map variable" in warnings["repositories:2"]
    repos = recipe(to, OS)["repositories"]
    assert repos[1]["url"] == "http://apt.example.invalid/debian" and repos[1]["components"] == ["extra"]
    assert "repositories:2: http://apt.example.invalid/debian names a host" in (to / f"{OS}.toml").read_text()


def test_existing_recipes_are_not_replaced_without_force(tmp_path: Path) -> None:
    config = installed_tree(tmp_path / "ez")
    _, to = imported(tmp_path, config)
    before = {p: p.read_bytes() for p in to.rglob("*") if p.is_file()}
    (config / "os" / "default" / "packages").write_text("systemd-sysv\n")
    r = run_vztt("import-ez", config, "--to", to, cache=tmp_path / "cache")
    assert r.returncode == EXIT_RECIPE and "exists; nothing written" in one_line_error(r)
    assert {p: p.read_bytes() for p in to.rglob("*") if p.is_file()} == before
    r = run_vztt("import-ez", config, "--to", to, "--force", cache=tmp_path / "cache")
    assert r.returncode == 0, r.stderr
    assert recipe(to, OS)["packages"]["include"] == ["systemd-sysv"]


def test_layer_recipe_errors(tmp_path: Path) -> None:
    config = installed_tree(tmp_path / "ez", apps={"hello": APP_FILES["hello"]})
    _, to = imported(tmp_path, config)
    layer = to / f"{OS}-hello.toml"
    text = layer.read_text()
    for body, message in (
        (text.replace(f'base = "{OS}"', 'base = "no-such-base"'), "base: parent recipe 'no-such-base' not found"),
        (text.replace(f'base = "{OS}"', f'base = "{OS}"\nrelease = "trixie"'),
         f"base: release 'trixie' differs from base {OS}'s 'bookworm'"),
        (text.replace(f'base = "{OS}"', f'base = "{OS}-hello"'), "base: inheritance cycle"),
    ):
        layer.write_text(body)
        r = run_vztt("show", f"{OS}-hello", recipes=to, cache=tmp_path / "cache")
        assert r.returncode == EXIT_RECIPE and message in one_line_error(r), r.stderr
