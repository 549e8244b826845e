"""The proof on an asynchronous API (Atlas Cloud): see proof.py."""

from __future__ import annotations

from proof import prove


def test_every_row_ends_once_and_nothing_is_paid_twice_under_faults_and_chaos(tmp_path):
    # A submit whose answer was lost is never resent: such a row ends answer_lost (counted), never paid twice
    prove(tmp_path, "atlascloud", {"moderation", "answer_lost"})
