"""A mirror's index must be fresh: never older than one seen before, never past its expiry.

A signature says who wrote an index, not when. Without more, whoever serves a
mirror (its operator, or anyone on the network path of a plain http:// URL)
can serve an older index with its valid signature (a rollback: hosts install
an older build, perhaps one with known holes), or keep serving today's forever
(a frozen mirror: hosts never see the fix). So:

- the index carries `serial` (one more with every publish) and `expires` (an
  ISO 8601 time, `vztt publish --expires`, default 30 days; publish signs the
  index again, with a new serial, once less than half of that is left);
- a host keeps, per mirror and per signing key, the highest serial it accepted
  (`TemplateCache.index_record`: <cache>/.mirrors/, written atomically under a
  lock), and refuses an index with a lower one;
- an index past its `expires`, or without one (no freshness guarantee at all:
  any index signed before its publisher set expiries could be replayed forever),
  is refused.

Each refusal is one line (exit 5, as a bad signature), and the next mirror is tried.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from vztt.base.files import atomic_write
from vztt.base.errors import EnvironmentProblem
from vztt.mirror.index import Index, MirrorError, expires_at
from vztt.store.locking import wait_for_flock
from vztt.store.templates import TemplateCache

DEFAULT_VALIDITY = "30d"
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
DURATION_RE = re.compile(r"([1-9][0-9]*)([smhdw])")
RECORD_LOCK_WAIT = 60.0


class StaleIndex(MirrorError):
    """A validly signed index that is older than one seen before, past its expiry, or
    without one: a rolled-back or frozen mirror."""


def parse_duration(text: str) -> timedelta:
    """`30d`, `12h`, `90m`, `3600s`, `2w` -> timedelta; ValueError otherwise."""
    m = DURATION_RE.fullmatch(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not a duration: a number and a unit, s, m, h, d or w (e.g. 30d, 12h)")
    return timedelta(seconds=int(m.group(1)) * UNITS[m.group(2)])


def now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def expiry(validity: timedelta) -> str:
    """The `expires` of an index signed now."""
    return (now() + validity).isoformat()


def needs_refresh(index: Index, validity: timedelta) -> bool:
    """Whether a publisher should sign the index again although nothing changed: it has no
    expiry (an older vztt wrote it), or less than half of `validity` is left."""
    try:
        expires = expires_at(index)
    except ValueError:
        return True
    return expires is None or expires - now() < validity / 2


@dataclass
class SeenIndex:
    """What a host accepted last from one mirror's index signed by one key."""

    mirror: str
    signer: str
    serial: int
    expires: str
    seen_at: str


def _read(path: Path) -> SeenIndex | None:
    try:
        doc = json.loads(path.read_text())
        return SeenIndex(mirror=str(doc["mirror"]), signer=str(doc["signer"]), serial=int(doc["serial"]),
                         expires=str(doc.get("expires", "")), seen_at=str(doc.get("seen_at", "")))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        # Refusing every index from here on is no answer to a damaged record; trusting any
        # serial is none either: say what is wrong, and let the owner remove it.
        raise EnvironmentProblem(f"{path}: unreadable record of the mirror's index serial ({e}); "
                                 "remove it to trust the mirror's next index afresh") from None


def check_index(cache: TemplateCache, index: Index, mirror: str, signer: str, where: str) -> None:
    """Refuse (StaleIndex) an index, already verified as signed by `signer`, that is older
    than the newest this cache accepted from `mirror` with that key, or past or without its
    expiry; record its serial once it passes."""
    serial = index.get("serial")
    if not isinstance(serial, int) or isinstance(serial, bool):
        raise StaleIndex(f"{where}: the index has no serial: refused")
    path = cache.index_record(mirror, signer)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(cache.index_records_lock, "a+") as lock:
        wait_for_flock(lock, exclusive=True, timeout=RECORD_LOCK_WAIT, busy=lambda: EnvironmentProblem(
            f"{cache.index_records_lock}: held for more than {RECORD_LOCK_WAIT:.0f} s"))
        seen = _read(path)
        if seen is not None and serial < seen.serial:
            raise StaleIndex(f"{where}: serial {serial} offered, but serial {seen.serial} was seen from {mirror} "
                             f"(signed by {signer}, {seen.seen_at}): an older index served again; refused")
        expires = expires_at(index)
        if expires is None:
            raise StaleIndex(f"{where}: the index (serial {serial}) has no expiry (`expires`), so nothing shows "
                             "it is current; refused (publish to the mirror again with this vztt)")
        if expires <= now():
            raise StaleIndex(f"{where}: the index (serial {serial}) expired at {expires.isoformat()}: the mirror "
                             "is frozen or its publisher stopped; refused")
        if seen is None or serial > seen.serial:
            record = SeenIndex(mirror=mirror, signer=signer, serial=serial, expires=expires.isoformat(),
                               seen_at=now().isoformat())
            atomic_write(path, json.dumps(asdict(record), indent=1, sort_keys=True) + "\n")
