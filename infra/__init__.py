"""The bottom layer: settings, topic names, group ids, Kafka client settings, admin and produce helpers,
run-folder secrets, and the one process supervisor.

Every package of the project may import it; it imports none of them (only `schemas/` for the
partitioner's name), so dependencies point down only.
"""
