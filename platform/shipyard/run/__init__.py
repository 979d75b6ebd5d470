"""A run's life as typed records: what each process reports, and the decisions over them.

``records`` (the pydantic records that cross every process boundary), ``ledger`` (the attempts
and the failure budget, kept in the Board actor) and ``decide`` (pure functions: a run's
outcome, a job's RUNNING/RESTARTING state). Nothing here imports Ray or torch.
"""
