"""Client commands as a trusted local edge builds them: the actor and role of `local_credentials`
(the bank rail deposits and withdraws, the operator changes statuses, an account acts for itself)."""
from __future__ import annotations

from schemas.commands import Command, local_credentials


def edge(command_class: type, **fields) -> Command:
    """`command_class(**fields)` with `actor` and `role` filled in where not given (ids not checked)."""
    actor, role = local_credentials(command_class, fields.get(command_class.owner_field, ""))
    fields.setdefault("actor", actor)
    fields.setdefault("role", role)
    return command_class(**fields)
