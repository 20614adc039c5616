-- The session-level advisory lock one ingest run at a time holds (see ingest.store.LOCK_KEYS).
SELECT pg_try_advisory_lock(%(namespace)s, %(key)s)
