"""Postgres access: the connection pool and the migrations."""
