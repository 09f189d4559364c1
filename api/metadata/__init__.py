"""The metadata database: who may do what (users, API keys) and what they saved (dashboards, analyses).

SQLite by default, PostgreSQL in production; the schema is owned by Alembic
(``api/metadata/migrations``) and brought up to date when the API starts.
"""
