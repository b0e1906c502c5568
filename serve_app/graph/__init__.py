"""The Ray graph: the stage deployments, the decoder -> tracker pull, and what crosses replicas.
`serve_app/app.py` binds it."""
