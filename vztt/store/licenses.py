"""Package licenses as the package databases state them, read as SPDX license
expressions when that can be done without guessing.

A Debian package states its licenses in a machine-readable copyright file
(DEP-5: one `License:` per `Files:` paragraph, in Debian's short names such as
`GPL-2+` or `LGPL-3+ or GPL-2+`); an rpm package in its `License` tag (the old
Fedora names such as `GPLv3+`, or an SPDX expression). The manifest keeps
what the database said (`licenses`, verbatim); `spdx_expression` turns that
into one SPDX expression (every name known, joined with AND), or None when a
single name has no exact SPDX identifier: an SBOM then says NOASSERTION
rather than a guess.
"""

from __future__ import annotations

import re

# Debian's DEP-5 short names (and the spellings packages use for them) -> SPDX identifiers.
# Only names whose meaning is fixed: "BSD" or "public-domain" are not licenses SPDX names.
_DEBIAN = {
    "gpl": "GPL-1.0-or-later",              # DEP-5: no version means any version
    "gpl-1": "GPL-1.0-only", "gpl-1+": "GPL-1.0-or-later",
    "gpl-2": "GPL-2.0-only", "gpl-2+": "GPL-2.0-or-later",
    "gpl-3": "GPL-3.0-only", "gpl-3+": "GPL-3.0-or-later",
    "lgpl": "LGPL-2.0-or-later",
    "lgpl-2": "LGPL-2.0-only", "lgpl-2+": "LGPL-2.0-or-later",
    "lgpl-2.1": "LGPL-2.1-only", "lgpl-2.1+": "LGPL-2.1-or-later",
    "lgpl-3": "LGPL-3.0-only", "lgpl-3+": "LGPL-3.0-or-later",
    "agpl-3": "AGPL-3.0-only", "agpl-3+": "AGPL-3.0-or-later",
    "gfdl-1.2": "GFDL-1.2-only", "gfdl-1.2+": "GFDL-1.2-or-later",
    "gfdl-1.3": "GFDL-1.3-only", "gfdl-1.3+": "GFDL-1.3-or-later",
    "apache-2": "Apache-2.0",
    "artistic": "Artistic-1.0-Perl",        # DEP-5: "Artistic" is Perl's
    "expat": "MIT", "mit/x11": "MIT",
    "bsd-2-clause": "BSD-2-Clause", "bsd-3-clause": "BSD-3-Clause", "bsd-4-clause": "BSD-4-Clause",
    "cc0": "CC0-1.0", "bsl-1": "BSL-1.0", "ms-pl": "MS-PL",
}

# The old Fedora/EL short names of the rpm License tag -> SPDX identifiers.
_FEDORA = {
    "gplv1": "GPL-1.0-only", "gplv1+": "GPL-1.0-or-later",
    "gplv2": "GPL-2.0-only", "gplv2+": "GPL-2.0-or-later",
    "gplv3": "GPL-3.0-only", "gplv3+": "GPL-3.0-or-later",
    "lgplv2": "LGPL-2.0-only", "lgplv2+": "LGPL-2.0-or-later",
    "lgplv2.1": "LGPL-2.1-only", "lgplv2.1+": "LGPL-2.1-or-later",
    "lgplv3": "LGPL-3.0-only", "lgplv3+": "LGPL-3.0-or-later",
    "agplv3": "AGPL-3.0-only", "agplv3+": "AGPL-3.0-or-later",
    "asl 2.0": "Apache-2.0", "mplv2.0": "MPL-2.0", "mplv1.1": "MPL-1.1",
    "zlib": "Zlib", "openssl": "OpenSSL", "python": "Python-2.0", "psfl": "Python-2.0",
}

# SPDX identifiers written as they are (the SPDX license list's spelling; matched without case).
_SPDX_IDS = {i.lower(): i for i in (
    "0BSD", "AFL-2.1", "AGPL-3.0-only", "AGPL-3.0-or-later", "Apache-1.1", "Apache-2.0", "Artistic-1.0-Perl",
    "Artistic-2.0", "Beerware", "BSD-1-Clause", "BSD-2-Clause", "BSD-3-Clause", "BSD-4-Clause", "BSL-1.0",
    "bzip2-1.0.6", "CC-BY-3.0", "CC-BY-4.0", "CC-BY-SA-3.0", "CC-BY-SA-4.0", "CC0-1.0", "CDDL-1.0",
    "curl", "EPL-1.0", "EPL-2.0", "FSFAP", "FSFUL", "FSFULLR", "FTL", "GFDL-1.2-only", "GFDL-1.2-or-later",
    "GFDL-1.3-only", "GFDL-1.3-or-later", "GPL-1.0-only", "GPL-1.0-or-later", "GPL-2.0-only",
    "GPL-2.0-or-later", "GPL-3.0-only", "GPL-3.0-or-later", "HPND", "ICU", "IJG", "ISC", "LGPL-2.0-only",
    "LGPL-2.0-or-later", "LGPL-2.1-only", "LGPL-2.1-or-later", "LGPL-3.0-only", "LGPL-3.0-or-later",
    "Libpng", "MIT", "MIT-0", "MPL-1.1", "MPL-2.0", "MS-PL", "NCSA", "OpenSSL", "PHP-3.01", "PostgreSQL",
    "Python-2.0", "Ruby", "Sleepycat", "TCL", "Unlicense", "Vim", "W3C", "WTFPL", "X11", "Zlib", "ZPL-2.1",
)}

# SPDX's deprecated "GPL-2.0+" style, which packages also write: the current identifiers.
_DEPRECATED = {f"{base}{suffix}".lower(): f"{base}-or-later" if suffix == "+" else f"{base}-only"
               for base in ("GPL-1.0", "GPL-2.0", "GPL-3.0", "LGPL-2.0", "LGPL-2.1", "LGPL-3.0", "AGPL-3.0")
               for suffix in ("+", "")}

# "<license> with <name> exception" (DEP-5) -> the SPDX exception identifier.
_EXCEPTIONS = {
    ("bison", "GPL-3.0-or-later"): "Bison-exception-2.2", ("bison", "GPL-2.0-or-later"): "Bison-exception-2.2",
    ("autoconf", "GPL-3.0-or-later"): "Autoconf-exception-3.0",
    ("autoconf", "GPL-2.0-or-later"): "Autoconf-exception-2.0",
    ("linux-syscall-note", "GPL-2.0-only"): "Linux-syscall-note",
}

_WITH = re.compile(r"^(?P<license>\S+)\s+with\s+(?P<exception>\S+)\s+exception$", re.I)


def identifiers() -> set[str]:
    """Every SPDX license identifier this module may write (the tests hold them to SPDX's list)."""
    return {*_DEBIAN.values(), *_FEDORA.values(), *_DEPRECATED.values(), *_SPDX_IDS.values()}


def exception_terms() -> list[str]:
    """Every `<license> WITH <exception>` this module may write."""
    return [f"{base} WITH {exception}" for (_, base), exception in _EXCEPTIONS.items()]


def spdx_id(name: str) -> str | None:
    """One license name (Debian, old Fedora or SPDX spelling) as an SPDX identifier, or None."""
    key = name.strip().lower()
    return _DEBIAN.get(key) or _FEDORA.get(key) or _DEPRECATED.get(key) or _SPDX_IDS.get(key)


def _term(text: str) -> str | None:
    """A license, possibly `with an exception`, as SPDX."""
    m = _WITH.match(text.strip())
    if m:
        base = spdx_id(m["license"])
        exception = _EXCEPTIONS.get((m["exception"].lower(), base or ""))
        return f"{base} WITH {exception}" if base and exception else None
    return spdx_id(text)


def _and_or(text: str) -> str | None:
    """`A or B and C` (DEP-5 and rpm: `and` binds tighter, as SPDX's AND) as SPDX."""
    # Split on the operators while keeping "with X exception" terms whole.
    parts = re.split(r"\s+(and|or|AND|OR)\s+", text.strip())
    out = []
    for i, part in enumerate(parts):
        if i % 2:
            out.append(part.upper())
            continue
        if part.lower() in ("and/or", ""):
            return None
        term = _term(part)
        if term is None:
            return None
        out.append(term)
    return " ".join(out)


def expression(declared: str) -> str | None:
    """One declared license field as an SPDX expression; None if a name has no SPDX identifier.
    Commas separate groups with the lowest precedence (DEP-5: `A or B, and C`)."""
    text = declared.strip()
    if not text or "(" in text or ")" in text:
        return None
    groups = re.split(r",\s*(?=(?:and|or)\s)", text, flags=re.I)
    out = []
    for i, group in enumerate(groups):
        op = ""
        if i:
            op, _, group = group.partition(" ")
            out.append(op.upper())
        converted = _and_or(group)
        if converted is None:
            return None
        out.append(f"({converted})" if len(groups) > 1 and " " in converted else converted)
    return " ".join(out)


def spdx_expression(declared: list[str] | tuple[str, ...]) -> str | None:
    """Every license a package declares, as one SPDX expression (the distinct ones
    joined with AND), or None when any one of them has no exact SPDX form."""
    terms: list[str] = []
    for d in declared:
        e = expression(d)
        if e is None:
            return None
        if e not in terms:
            terms.append(e)
    if not terms:
        return None
    if len(terms) == 1:
        return terms[0]
    return " AND ".join(f"({t})" if " OR " in t else t for t in terms)
