"""`wanx serve`: the job queue (jobs.py), the REST API (api.py) and the web UI (ui.py) of one loaded model (app.py)."""
