"""`tunesmith web-ui`: the studio (app.py routes, jobs.py subprocesses, paths.py confinement, estimate.py probe)."""
