"""Virtuozzo EZ templates into recipes: `vztt import-ez SOURCE`.

    source.py   find the templates: an installed tree (`<os>/<ver>/<arch>/config/`:
                os/default, os/<set>, app/<app>/<set>) or a source tree whose spec
                maps `<tmpl>_<file>` into that layout
    rules.py    vztt's own parsing rules for the files (src/util.c, src/template.c)
    urlmap.py   url.map variables ($DEB_SERVER...) -> our mirror variables
    mapping.py  one EZ template -> one recipe draft, with what was mapped and what not
    write.py    the drafts as TOML and the scripts beside them, checked by loading
                them before anything is put in place

A front end beside cli/: it uses recipe/ (to check what it writes) and base/;
only cli/ imports it.
"""
