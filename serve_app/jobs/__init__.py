"""Async jobs: a durable store of records and files (store.py), and the runner in each ingress
replica that claims and runs them (runner.py). The HTTP routes are serve_app/api/async_jobs.py."""
