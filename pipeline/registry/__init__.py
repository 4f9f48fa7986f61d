"""Stages `register` + `promote`.

- ``contract``: alias names, version tag keys and run artifact paths as typed objects; the champion rule;
- ``read``: aliases, versions, records, gate decisions, models (no writes);
- ``write``: registration, gate/approval records, alias moves, rollback;
- ``lock``: one writer of the aliases at a time (file lock, optionally inside a Prefect limit);
- ``decision``: the promotion decision, a pure function of the evidence;
- ``gate``: gathering that evidence (champion re-scoring, certificate, validation) + the decision;
- ``promote``: the one promotion path (register → gate → record → move, approval when required);
- ``modelcard``, ``export``: model card per version; SavedModel + ONNX export with a parity check.
"""
