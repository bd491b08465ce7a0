"""Sweeps (issue 20): hyperparameter searches and ablations whose trials are ordinary jobs.

schemas.py   the request (SweepCreate: a search or an ablation) and the response bodies
ablation.py  the levers and the fixed plan of an ablation
study.py     Optuna, as a library: the study rebuilt in memory from our rows; ask, tell,
             should-prune, importances (imports optuna: load it lazily)
service.py   create / read / list / cancel (API side) and advance (tell finished trials, ask
             new ones, finish the sweep), safe with any number of concurrent advancers;
             ablation_jobs(session, sweep_id) for the report
trials.py    the worker side: TrialHook, called with each stored EpochRecord of a trial's job,
             says whether the pruner stops it
plots.py     GET /sweeps/{id}.png (matplotlib: load it lazily)

docs/sweeps.md explains the design.
"""
