"""Audit and replay: prove every balance from the log (`wallet audit`)."""

from consumers.audit.runner import run_audit

__all__ = ["run_audit"]
