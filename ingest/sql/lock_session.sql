-- The PostgreSQL session holding the ingest lock (ingest.store.LOCK_KEYS): who, from where, since when.
-- A two-key advisory lock is classid = first key, objid = second key, objsubid = 2.
SELECT a.pid, host(a.client_addr) AS client_addr, a.application_name, a.backend_start, a.state, a.state_change
FROM pg_locks l
JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted
  AND l.classid = %(namespace)s AND l.objid = %(key)s AND l.objsubid = 2
LIMIT 1
