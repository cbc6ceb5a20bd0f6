"""The technologist console: live web pages, the JSON API, metrics and health (ASGI).

A thin adapter: every route parses its input, calls a service, and renders or returns JSON.
"""
