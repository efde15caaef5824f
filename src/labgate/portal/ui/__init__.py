"""The web UI: server-rendered Jinja2 pages with small hand-written CSS and JavaScript.

No front-end build step: ``templates/`` and ``static/`` are used as they are.
Pages read and change everything through the REST API (``fetch`` with the
session's CSRF token); only signing in and out are plain form posts. See
``docs/user-guide.md`` for what users see.
"""
