"""Production orchestration on a Prefect server: the server itself (``server``), task
caching and retries (``caching``), the data watcher (``watch``) and the deployments,
schedules, event trigger and work pool (``deploy``)."""
