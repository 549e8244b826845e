"""The proof on a synchronous API (Qianfan): see proof.py."""

from __future__ import annotations

from proof import prove


def test_every_row_ends_once_and_nothing_is_paid_twice_under_faults_and_chaos(tmp_path):
    # A lost answer is asked again (and counted), so only moderation can fail a row
    prove(tmp_path, "qianfan", {"moderation"})
