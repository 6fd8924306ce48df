"""Client commands as a trusted local edge builds them: the actor and role of `local_credentials`
(the bank rail deposits and withdraws, the operator changes statuses, an account acts for itself).
One implementation, the client library's: `edge` is `local_command` under the tests' name."""

from __future__ import annotations

from producers.client import local_command as edge

__all__ = ["edge"]
