UPDATE reviewers SET lead = %(lead)s WHERE name = %(name)s RETURNING id
