"""The HTTP face: the ingress deployment, its routes, upload reading, the job JSON, the proxy's
body cap and metrics. Starlette and Ray are imported only by the modules that serve."""
