"""Segments: which group a customer is in (lifecycle stage so far), as pure functions of the
customer's profile and event time."""
