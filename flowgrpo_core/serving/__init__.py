"""Reward servers: each reward model in its own process behind ``POST /score`` (JSON + base64 PNG).

- ``protocol``: wire format and limits;  ``batching``: merging concurrent requests;
- ``server``: the HTTP server;  ``client``: ``RemoteReward``;  ``retrying_http``: retries, backoff, deadline;
- ``manager``: start/stop local server processes;  ``commands``: ``flowgrpo serve-reward``.
"""
