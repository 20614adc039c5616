-- Lock an item for a decision. Its current decision is read after the lock, by item_current
-- (a statement of its own: under READ COMMITTED it sees what a concurrent decision committed while
-- this one waited; a join here would read the joined rows from before the wait).
SELECT id FROM review_items WHERE id = %(item_id)s FOR UPDATE
