"""The review desk: staff decide the photos the model was unsure of (and an audit sample of those
it accepted) in a browser; their decisions go to PostgreSQL and back into training (`export`).

`python -m review serve | up | down | add-reviewer NAME | audit-share X | export --out DIR`.
Only review.app imports Flask; the rest (queue, export, process) runs without it.
"""
