"""Matching what a site sent against what the server received, message by message.

A message is identified on both sides by (job id, site, task, round); its payload by SHA-256.
For each message a site logged, the match says:

- ``matched``: the server logged the same hash for it;
- ``hash_mismatch``: the server logged a *different* payload for it (altered in transit, a log
  edited, or someone else sending in the site's name);
- ``not_received``: the server's log is there but has no such message (lost, timed out, or sent
  after the server moved on);
- ``unverified``: no server log was available to this audit.

And a message the server logged for the site that the site never sent is ``not_sent_by_site``.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Literal

from ultrafedfm.privacy.audit.payloads import PayloadRecord

_logger = logging.getLogger(__name__)

__all__ = ["MATCH_STATES", "MessageMatch", "match_payloads"]

MatchState = Literal["matched", "hash_mismatch", "not_received", "unverified", "not_sent_by_site"]
MATCH_STATES = ("matched", "hash_mismatch", "not_received", "unverified", "not_sent_by_site")


@dataclass(frozen=True)
class MessageMatch:
    """One message and what the other side's log says about it."""

    state: MatchState
    sent: PayloadRecord | None  # None: only the server logged it
    received: PayloadRecord | None  # None: the server did not log it (or no log)

    @property
    def record(self) -> PayloadRecord:
        return self.sent or self.received


def match_payloads(sent: Iterable[PayloadRecord], received: Iterable[PayloadRecord] | None, *,
                   sites: Iterable[str] | None = None) -> list[MessageMatch]:
    """Match a site's outgoing records against the server's received records.

    Args:
        sent: the site's outgoing log (one site, or several).
        received: the server's received log (``None``: not available -- every message is ``unverified``).
        sites: whose received records count as "not sent by site" when unmatched (default: the senders in ``sent``).
    """
    sent = list(sent)
    if received is None:
        return [MessageMatch("unverified", s, None) for s in sent]
    sites = set(sites) if sites is not None else {s.site for s in sent}
    pending: dict[tuple, list[PayloadRecord]] = defaultdict(list)
    for r in received:
        if r.site in sites:
            pending[r.key].append(r)
    matches = []
    for s in sent:
        candidates = pending.get(s.key, [])
        same = next((r for r in candidates if r.sha256 == s.sha256), None)
        if same is not None:
            candidates.remove(same)
            matches.append(MessageMatch("matched", s, same))
        elif candidates:
            matches.append(MessageMatch("hash_mismatch", s, candidates.pop(0)))
        else:
            matches.append(MessageMatch("not_received", s, None))
    for leftovers in pending.values():
        matches.extend(MessageMatch("not_sent_by_site", None, r) for r in leftovers)
    return matches
