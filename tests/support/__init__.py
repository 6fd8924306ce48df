"""Test helpers that stand in for the parts of the system a pure-core test does not run."""
