SELECT review_settle(%(item_id)s)
